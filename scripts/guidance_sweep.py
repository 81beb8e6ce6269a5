"""What guidance buys and costs: the sweeps of notebook 08, over the CFG weight w and the classifier-guidance scale s.

    DDPM_DATA=../shared/data python scripts/guidance_sweep.py [--num 1000] [--steps 50]

Draws --num DDIM samples per strength (an equal share of each digit, the same seed for every
strength) from the class-conditional model with classifier-free guidance, and from the
unconditional model guided by the noisy classifier, and scores them with the MNIST judge (label
accuracy, confident share, class-wise and overall Frechet distance; ddpm_lib.guided_evaluation).
Rows are cached in docs/guidance.json (keyed by the SHA-256 of the weights), so an interrupted
run continues where it stopped; the table goes to docs/guidance.md, the plot to figures/guidance_sweep.png.
"""

import argparse
import dataclasses
import sys
from pathlib import Path

import torch

from ddpm_lib.checkpoint import load_model
from ddpm_lib.classifier import load_classifier, mnist_tensors, predict
from ddpm_lib.devices import device_name, use_bf16
from ddpm_lib.evaluation import Measurement, weights_sha256
from ddpm_lib.files import atomic_write
from ddpm_lib.guided_evaluation import class_references, guided_floor, guided_sweep, markdown_table, plot_sweep
from ddpm_lib.metrics import gaussian_stats
from ddpm_lib.noisy_classifier import load_noisy_classifier
from ddpm_lib.training import PRECISIONS

WEIGHTS = (0, 0.5, 1, 2, 4, 8)  # classifier-free guidance weights w (Ho & Salimans' convention; 0: the conditional model)
SCALES = (0, 0.5, 1, 2, 4, 8)  # classifier-guidance scales s (0: the unconditional model, unguided)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cfg-checkpoint", default="checkpoints/mnist_cfg.pt")
    parser.add_argument("--checkpoint", default="checkpoints/mnist_ddpm.pt", help="the unconditional model classifier guidance steers")
    parser.add_argument("--classifier", default="checkpoints/mnist_noisy_classifier.pt")
    parser.add_argument("--judge", default="checkpoints/mnist_classifier.pt")
    parser.add_argument("--data-root", help="data folder (default: $DDPM_DATA, else ./data)")
    parser.add_argument("--num", type=int, default=1000, help="samples per strength")
    parser.add_argument("--steps", type=int, default=50, help="DDIM steps")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--precision",
        choices=PRECISIONS,
        default="auto",
        help="the U-Net under bf16 autocast or in fp32; auto: bf16 where fast, and rows cached in either precision are reused",
    )
    parser.add_argument("--only", choices=("cfg", "classifier"), help="run one sweep only")
    parser.add_argument("--cache", default="docs/guidance.json")
    parser.add_argument("--markdown", default="docs/guidance.md")
    parser.add_argument("--plot", default="figures/guidance_sweep.png")
    args = parser.parse_args()

    judge = load_classifier(args.judge)
    x_test, y_test = mnist_tensors(args.data_root, train=False)
    x_train, y_train = mnist_tensors(args.data_root, train=True)
    references, overall = class_references(judge, x_test, y_test), gaussian_stats(predict(judge, x_test)[0])
    floor = guided_floor(judge, x_train, y_train, references, overall, args.num, args.seed)
    bf16 = use_bf16(args.precision, torch.device("cpu"))
    measured = Measurement(args.num, args.seed, bf16, args.cache, any_precision=args.precision == "auto", on_row=None)
    print(f"{args.num} DDIM-{args.steps} samples per strength, U-Net in {'bf16' if bf16 else 'fp32'}, on {device_name('cpu')}")

    def report(row):
        g = row.guided
        print(f"  {row.method} {row.strength:g}: {g.label_accuracy:.1%} as asked, {row.seconds_per_image:.3f} s/image", flush=True)

    rows = []
    if args.only in (None, "cfg"):
        model, diffusion = load_model(args.cfg_checkpoint)
        model_id = weights_sha256(model, diffusion)
        measurement = dataclasses.replace(measured, model_id=model_id, on_row=report)
        rows += guided_sweep(model, diffusion, judge, references, overall, "cfg", WEIGHTS, args.steps, measurement=measurement)
    if args.only in (None, "classifier"):
        model, diffusion = load_model(args.checkpoint)
        classifier, _ = load_noisy_classifier(args.classifier)
        model_id = f"{weights_sha256(model, diffusion)}+{weights_sha256(classifier, diffusion)}"
        measurement = dataclasses.replace(measured, model_id=model_id, on_row=report)
        rows += guided_sweep(model, diffusion, judge, references, overall, "classifier", SCALES, args.steps, classifier, measurement)
    table = markdown_table(rows, floor)
    print(table)
    header = (
        f"Measured by `scripts/guidance_sweep.py`: w on `{args.cfg_checkpoint}`, s on `{args.checkpoint}` with "
        f"`{args.classifier}`; {args.num} DDIM-{args.steps} samples per row ({args.num // 10} per digit), seed {args.seed}, "
        f"U-Net in {' or '.join(sorted({'bf16 autocast' if r.bf16 else 'fp32' for r in rows}))}, on {device_name('cpu')}. "
        f"Judged by `{args.judge}`.\n\n"
    )
    if args.only is None:
        with atomic_write(args.markdown) as tmp:
            Path(tmp).write_text(header + table + "\n")
        with atomic_write(args.plot) as tmp:
            plot_sweep(rows, floor).savefig(tmp, format="png", dpi=100, bbox_inches="tight")
    return 0


if __name__ == "__main__":
    sys.exit(main())
