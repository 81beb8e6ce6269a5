"""How long the training CLI takes to reach the course's quality targets, from a run's EMA snapshots.

    python -m ddpm_lib train --dataset mnist --snapshot-every 500 --out runs/mnist.pt
    DDPM_DATA=../shared/data python scripts/time_to_quality.py runs/mnist.pt [--num 1000]

Scores each snapshot (runs/mnist_step0000500.pt, ...) in order with DDIM 50 (Euler's method on a
linear-flow model); the first one that meets the targets is then scored with its path's own sampler
(DDPM 1000 on the VP path, Euler 100 on the linear flow), and the first snapshot meeting both is the
answer: its training wall time (stored in the checkpoint) is the time to quality. Rows are cached
in docs/quality.json like scripts/evaluate.py's (keyed by the weights, so the last snapshot and
the checkpoint exported from it share their rows); a second call only scores what is new.
"""

import argparse
import sys
from pathlib import Path

from ddpm_lib.checkpoint import load_checkpoint, load_model
from ddpm_lib.classifier import load_classifier, mnist_tensors
from ddpm_lib.devices import resolve_device, use_bf16
from ddpm_lib.evaluation import Measurement, evaluate, weights_sha256
from ddpm_lib.metrics import real_data_floor, reference_stats, target_misses
from ddpm_lib.solvers import DDIM, SOLVERS
from ddpm_lib.training import PRECISIONS

DDIM50 = DDIM(50)  # a row of the quality table, on either path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", help="the --out of the training run; its snapshots lie beside it")
    parser.add_argument("--classifier", default="checkpoints/mnist_classifier.pt")
    parser.add_argument("--data-root", help="data folder (default: $DDPM_DATA, else ./data)")
    parser.add_argument("--num", type=int, default=1000, help="samples per evaluation")
    parser.add_argument("--cache", default="docs/quality.json")
    parser.add_argument("--precision", choices=PRECISIONS, default="auto", help="the U-Net under bf16 autocast (auto: where fast) or fp32")
    parser.add_argument("--device", default="cpu", help="where the snapshots sample: cpu (the default), cuda or cuda:N")
    parser.add_argument("--all", action="store_true", help="score every snapshot with both samplers, not only up to the first success")
    args = parser.parse_args()

    run = Path(args.run)
    snapshots = sorted(run.parent.glob(f"{run.stem}_step*{run.suffix}"))
    if not snapshots:
        print(f"no snapshots {run.stem}_step*{run.suffix} beside {run}; train with --snapshot-every", file=sys.stderr)
        return 2
    device = resolve_device(args.device)
    bf16 = use_bf16(args.precision, device)
    classifier = load_classifier(args.classifier)
    reference = reference_stats(classifier, mnist_tensors(args.data_root, train=False)[0])
    floor = real_data_floor(classifier, mnist_tensors(args.data_root, train=True)[0], reference, args.num)
    print(f"floor ({args.num} real training images): FD {floor.frechet:.2f}, confident {floor.confident:.1%}, entropy {floor.entropy:.3f}")
    machines = load_checkpoint(snapshots[-1]).get("machine_seconds", {})  # the last snapshot's split covers the earlier ones
    if machines:
        print("trained on " + "; ".join(f"{name}: {seconds / 60:.1f} min" for name, seconds in machines.items()))
    print(f"{'snapshot':<28} {'minutes':>7}  {'sampler':<26} {'FD':>6} {'FD/floor':>8} {'confident':>9} {'entropy':>7}  verdict")
    for path in snapshots:
        model, diffusion = load_model(path, device)
        minutes = load_checkpoint(path).get("train_seconds", float("nan")) / 60
        met = True
        own = SOLVERS[diffusion.make_path().default_solver]()  # its default steps: DDPM 1000 on VP, Euler 100 on the flow
        for setting in (DDIM50, own):
            model_id = weights_sha256(model, diffusion)
            measurement = Measurement(args.num, cache=args.cache, model_id=model_id, bf16=bf16)
            (row,) = evaluate(model, diffusion, classifier, reference, [setting], measurement)
            q, misses = row.quality, target_misses(row.quality, floor)
            verdict = "meets the targets" if not misses else "; ".join(misses)
            print(
                f"{path.name:<28} {minutes:>7.1f}  {row.label:<26} {q.frechet:>6.2f} {q.frechet / floor.frechet:>8.1f} "
                f"{q.confident:>9.1%} {q.entropy:>7.3f}  {verdict}",
                flush=True,
            )
            met = met and not misses
            if misses and not args.all:
                break
        if met and not args.all:
            print(f"time to quality: {minutes:.1f} min of training ({path.name})")
            return 0
    return 0 if args.all else 1


if __name__ == "__main__":
    sys.exit(main())
