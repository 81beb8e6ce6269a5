"""Train the time-conditioned MNIST classifier of classifier guidance; ship it as checkpoints/mnist_noisy_classifier.pt.

    DDPM_DATA=../shared/data python scripts/train_noisy_classifier.py [--steps 4000] [--out checkpoints/mnist_noisy_classifier.pt]

Trains on the MNIST training split, noised to every t of the shipped model's schedule (linear,
T = 1000), and prints its accuracy on the noised test split against t: the table of
checkpoints/README.md.
"""

import argparse
import sys
import time

from ddpm_lib.classifier import mnist_tensors
from ddpm_lib.diffusion import DiffusionConfig
from ddpm_lib.noisy_classifier import accuracy_by_t, save_noisy_classifier, train_noisy_classifier
from ddpm_lib.unet import count_parameters

TIMESTEPS = [0, 100, 200, 300, 400, 500, 600, 700, 800, 900, 999]  # 0-based t of the accuracy table


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-root", help="data folder (default: $DDPM_DATA, else ./data)")
    parser.add_argument("--steps", type=int, default=4000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="checkpoints/mnist_noisy_classifier.pt")
    args = parser.parse_args()

    diffusion = DiffusionConfig()  # the shipped model's: linear, T = 1000
    schedule = diffusion.make_schedule()
    x_train, y_train = mnist_tensors(args.data_root, train=True)
    x_test, y_test = mnist_tensors(args.data_root, train=False)
    start = time.perf_counter()
    model = train_noisy_classifier(x_train, y_train, schedule, steps=args.steps, seed=args.seed)
    minutes = (time.perf_counter() - start) / 60
    accuracy = dict(zip(TIMESTEPS, accuracy_by_t(model, x_test, y_test, schedule, TIMESTEPS), strict=True))
    print(f"{count_parameters(model):,} parameters, {len(x_train):,} training images, {args.steps} steps of 128 in {minutes:.1f} min")
    print(f"test accuracy against t ({len(x_test):,} noised test images, seed 0):\n")
    print("| t (0-based) | " + " | ".join(map(str, accuracy)) + " |")
    print("|---|" + "---:|" * len(accuracy))
    print("| accuracy | " + " | ".join(f"{a:.1%}" for a in accuracy.values()) + " |")
    save_noisy_classifier(args.out, model, diffusion, accuracy, len(x_train))
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
