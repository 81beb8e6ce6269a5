"""Training runs of different paths or objectives side by side: quality by training step, and at equal sampling cost.

    DDPM_DATA=../shared/data python scripts/compare_paths.py runs/cmp/ddpm.pt runs/cmp/flow.pt runs/cmp/flow_ln.pt

Each run is the --out of a training run with --snapshot-every. Its snapshots are scored with DDIM 50 (Euler's
method on a linear-flow model), the rows scripts/time_to_quality.py scores, and its last snapshot with Euler/DDIM
and Heun at 10, 20 and 50 network evaluations each. All in fp32, from seed 0, --num samples a row, cached in
docs/quality.json like scripts/evaluate.py's rows. Prints two markdown tables (docs/experiments.md, section 9).

The runs compare at equal steps: the recipes here differ in the path, the target and the weighting only, which cost
the same few elementwise operations beside the U-Net, so a step takes the same time in each (scripts/benchmark.py
measures it); equal steps are equal training time on any machine, however loaded.
"""

import argparse
import sys
from pathlib import Path

from ddpm_lib.checkpoint import load_checkpoint, load_model
from ddpm_lib.classifier import load_classifier, mnist_tensors
from ddpm_lib.evaluation import EQUAL_COST, Measurement, evaluate, weights_sha256
from ddpm_lib.metrics import real_data_floor, reference_stats
from ddpm_lib.solvers import DDIM


def describe(diffusion, train) -> str:
    """A run's objective in a few words: its path, target, weighting and training times."""
    times = f", {train['time_sampling']} times" if diffusion.path != "vp" else ""
    return f"{diffusion.path}, {diffusion.prediction}, {train['loss_weighting']}{times}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", help="the --out of each training run; its snapshots lie beside it")
    parser.add_argument("--classifier", default="checkpoints/mnist_classifier.pt")
    parser.add_argument("--data-root", help="data folder (default: $DDPM_DATA, else ./data)")
    parser.add_argument("--num", type=int, default=1000, help="samples per row")
    parser.add_argument("--cache", default="docs/quality.json")
    args = parser.parse_args()

    classifier = load_classifier(args.classifier)
    reference = reference_stats(classifier, mnist_tensors(args.data_root, train=False)[0])
    floor = real_data_floor(classifier, mnist_tensors(args.data_root, train=True)[0], reference, args.num).frechet
    by_step, at_cost = [], []
    for run in map(Path, args.runs):
        snapshots = sorted(run.parent.glob(f"{run.stem}_step*{run.suffix}"))
        if not snapshots:
            print(f"no snapshots {run.stem}_step*{run.suffix} beside {run}; train with --snapshot-every", file=sys.stderr)
            return 2
        for i, path in enumerate(snapshots):
            model, diffusion = load_model(path, "cpu")
            state = load_checkpoint(path)
            measurement = Measurement(args.num, cache=args.cache, model_id=weights_sha256(model, diffusion))
            settings = EQUAL_COST if i == len(snapshots) - 1 else (DDIM(50),)
            rows = evaluate(model, diffusion, classifier, reference, settings, measurement)
            name = f"{run.stem} ({describe(diffusion, state['train_config'])})"
            steps, minutes = state["step"], state.get("train_seconds", float("nan")) / 60
            (ddim50,) = [r for r in rows if r.label.startswith("DDIM 50")]
            q = ddim50.quality
            by_step.append(
                f"| {name} | {steps:,} | {minutes:.1f} | {q.frechet:.2f} | {q.frechet / floor:.1f} | {q.confident:.1%} | {q.entropy:.3f} |"
            )
            print(by_step[-1], flush=True)
            if i == len(snapshots) - 1:
                cells = " | ".join(f"{r.quality.frechet:.2f} / {r.quality.confident:.1%}" for r in rows)
                at_cost.append(f"| {name}, step {steps:,} | {cells} |")
    print(f"\nreal-data floor ({args.num} training images): Frechet distance {floor:.2f}\n")
    print("| run | step | training time (min) | Frechet distance (DDIM 50) | FD / floor | confident | class entropy |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    print("\n".join(by_step))
    labels = " | ".join(f"{s.title} {e}" for s, e in zip(EQUAL_COST, (10, 20, 50) * 2, strict=True))
    print(f"\nFrechet distance / confident share at equal network evaluations (Heun K steps: 2K - 2 evaluations)\n\n| run | {labels} |")
    print("|---|" + "---:|" * len(EQUAL_COST))
    print("\n".join(at_cost))
    return 0


if __name__ == "__main__":
    sys.exit(main())
