"""Sample quality of a trained MNIST model under every sampler: the table of notebook 07.

    DDPM_DATA=../shared/data python scripts/evaluate.py [--checkpoint checkpoints/mnist_ddpm.pt] [--num 1000]

For each sampler setting (DDPM 1000 with both variances, DDIM 100/50/20/10, DDIM 50 with eta 1, Heun
and DPM-Solver++(2M) at 5 to 50 network evaluations; ddpm_lib.evaluation.SETTINGS) it
draws --num samples and prints the Frechet distance, confident share and class entropy, beside the
real-data floor at the same number of images, then each row's class histogram (images per
predicted digit). Then the settings the course compares (ddpm_lib.evaluation.COMPARED) at each of
--seeds, all in one precision, as mean +- standard deviation. Rows are cached in docs/quality.json (keyed by the
checkpoint's SHA-256), so an interrupted run continues where it stopped; both tables go to
docs/quality.md and the quality-vs-steps plot to figures/quality_vs_steps.png.
"""

import argparse
import dataclasses
import sys
from pathlib import Path

import torch

from ddpm_lib.checkpoint import load_model
from ddpm_lib.classifier import load_classifier, mnist_tensors
from ddpm_lib.devices import device_name, use_bf16
from ddpm_lib.evaluation import (
    COMPARED,
    PAIRED,
    SEEDS,
    SETTINGS,
    Measurement,
    class_count_table,
    evaluate,
    markdown_table,
    paired_table,
    plot_quality,
    spread_table,
    weights_sha256,
)
from ddpm_lib.files import atomic_write
from ddpm_lib.metrics import real_data_floor, reference_stats
from ddpm_lib.training import PRECISIONS


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default="checkpoints/mnist_ddpm.pt")
    parser.add_argument("--classifier", default="checkpoints/mnist_classifier.pt")
    parser.add_argument("--data-root", help="data folder (default: $DDPM_DATA, else ./data)")
    parser.add_argument("--num", type=int, default=1000, help="samples per sampler setting")
    parser.add_argument("--seed", type=int, default=0, help="the seed of the main table")
    parser.add_argument("--seeds", type=int, nargs="*", default=list(SEEDS), help="the seeds of the comparisons with error bars")
    parser.add_argument(
        "--precision",
        choices=PRECISIONS,
        default="auto",
        help="the U-Net under bf16 autocast or in fp32; auto: bf16 where fast, and rows cached in either precision are reused",
    )
    parser.add_argument("--only", nargs="*", help="labels of the settings to run (default: all)")
    parser.add_argument("--cache", default="docs/quality.json")
    parser.add_argument("--markdown", default="docs/quality.md")
    parser.add_argument("--plot", default="figures/quality_vs_steps.png")
    args = parser.parse_args()

    model, diffusion = load_model(args.checkpoint)
    classifier = load_classifier(args.classifier)
    reference = reference_stats(classifier, mnist_tensors(args.data_root, train=False)[0])
    floor = real_data_floor(classifier, mnist_tensors(args.data_root, train=True)[0], reference, args.num, args.seed)
    path = diffusion.make_path()
    settings = [s for s in SETTINGS if not args.only or s.label(path) in args.only]
    bf16 = use_bf16(args.precision, torch.device("cpu"))
    precision = "bf16 autocast" if bf16 else "fp32"
    print(f"{args.checkpoint}: {args.num} samples per row, U-Net in {precision}, on {device_name('cpu')}")
    model_id = weights_sha256(model, diffusion)

    def on_row(row):
        print(f"  {row.label}, seed {row.seed}: FD {row.quality.frechet:.2f}", flush=True)

    measured = Measurement(args.num, args.seed, bf16, args.cache, model_id, any_precision=args.precision == "auto", on_row=on_row)
    rows = evaluate(model, diffusion, classifier, reference, settings, measured)
    table = markdown_table(rows, floor, diffusion.make_path())
    histograms = class_count_table(rows, floor)
    print(table, histograms, sep="\n\n")
    compared_settings = [solver for solver in COMPARED if not args.only or solver.label(path) in args.only]
    compared = [
        row
        for seed in args.seeds
        for row in evaluate(
            model, diffusion, classifier, reference, compared_settings, dataclasses.replace(measured, seed=seed, any_precision=False)
        )
    ]
    spread = spread_table(compared, diffusion.make_path()) if compared else ""
    paired = paired_table(compared, PAIRED) if compared else ""
    print(spread, paired, sep="\n\n")
    precisions = " or ".join(sorted({"bf16 autocast" if row.bf16 else "fp32" for row in rows}))
    header = (
        f"Measured by `scripts/evaluate.py` on `{args.checkpoint}`, {args.num} samples per row, seed {args.seed}, "
        f"the U-Net in {precisions} (last column). Cost is counted in U-Net evaluations per image; sampling speed is "
        "in [benchmarks.md](benchmarks.md).\n\n"
    )
    paired_header = (
        "The same rows as differences, seed by seed: each seed starts both samplers from the same noise, so a "
        "difference is measured more precisely than the spreads above suggest.\n\n"
    )
    seeds_header = (
        f"Each setting at seeds {', '.join(map(str, args.seeds))}, {args.num} samples per seed, all with the U-Net in "
        f"{'bf16 autocast' if bf16 else 'fp32'}: the mean ± the sample standard deviation over the seeds. "
        'DPM-Solver++(3M) is the library\'s third-order update; "as published" is the update of diffusers and the '
        "DPM-Solver code, second order.\n\n"
    )
    with atomic_write(args.markdown) as tmp:
        Path(tmp).write_text(
            f"{header}{table}\n\nImages per digit the classifier sees (the class histogram):\n\n{histograms}\n"
            + (f"\n## Across seeds\n\n{seeds_header}{spread}\n\n{paired_header}{paired}\n" if compared else "")
        )
    if len(rows) == len(SETTINGS):
        with atomic_write(args.plot) as tmp:
            plot_quality(rows, floor, diffusion.make_path()).savefig(tmp, format="png", dpi=100, bbox_inches="tight")
    return 0


if __name__ == "__main__":
    sys.exit(main())
