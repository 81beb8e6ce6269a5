"""Slider update latency: the kernel time of one slider move for each of the course's widgets.

    python scripts/benchmark_sliders.py [--checkpoint checkpoints/mnist_ddpm.pt]

Prints a table of the median and worst time per update over random slider positions. Target:
well under 50 ms, so that scrubbing feels live.
"""

import argparse
import random
import statistics
import time

import torch

from ddpm_lib.checkpoint import load_model
from ddpm_lib.sampling import sample_loop
from ddpm_lib.schedules import SCHEDULES, get_schedule
from ddpm_lib.viz import forward_explorer, schedule_explorer, trajectory_viewer


def time_updates(viewer, values: list[int]) -> list[float]:
    times = []
    for value in values:
        start = time.perf_counter()
        viewer.slider.value = value
        times.append((time.perf_counter() - start) * 1000)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default="checkpoints/mnist_ddpm.pt")
    parser.add_argument("--moves", type=int, default=50)
    args = parser.parse_args()
    rng = random.Random(0)
    torch.manual_seed(0)
    x0 = torch.rand(8, 1, 28, 28) * 2 - 1
    schedule = get_schedule("linear", 1000)
    model, diffusion = load_model(args.checkpoint)
    trajectory = list(sample_loop(model, diffusion.make_schedule(), (16, 1, 28, 28), sampler="ddim", steps=100))

    viewers = {
        "forward_explorer (notebook 1)": forward_explorer(x0, schedule),
        "schedule_explorer (notebook 2)": schedule_explorer(x0[:1], {n: get_schedule(n, 1000) for n in SCHEDULES}),
        "trajectory_viewer, first visit (notebook 5)": trajectory_viewer(trajectory, nrow=4),
    }
    print(f"{'widget':<46} {'median ms':>10} {'worst ms':>9}")
    for name, viewer in viewers.items():
        times = time_updates(viewer, [rng.randrange(viewer.slider.min, viewer.slider.max + 1) for _ in range(args.moves)])
        print(f"{name:<46} {statistics.median(times):>10.1f} {max(times):>9.1f}")
    cached = viewers["trajectory_viewer, first visit (notebook 5)"]
    times = time_updates(cached, [rng.randrange(cached.slider.min, cached.slider.max + 1) for _ in range(args.moves)])
    print(f"{'trajectory_viewer, cached (notebook 5)':<46} {statistics.median(times):>10.1f} {max(times):>9.1f}")


if __name__ == "__main__":
    main()
