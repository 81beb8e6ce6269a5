"""Train the MNIST classifier behind ddpm_lib.metrics and ship it as checkpoints/mnist_classifier.pt.

    DDPM_DATA=../shared/data python scripts/train_classifier.py [--epochs 6] [--out checkpoints/mnist_classifier.pt]

Trains on the MNIST training split only, reports accuracy on the test split, and refuses to
write a model below 99% test accuracy.
"""

import argparse
import sys
import time

from ddpm_lib.classifier import accuracy, mnist_tensors, save_classifier, train_classifier
from ddpm_lib.unet import count_parameters

MIN_ACCURACY = 0.99


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-root", help="data folder (default: $DDPM_DATA, else ./data)")
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="checkpoints/mnist_classifier.pt")
    args = parser.parse_args()

    x_train, y_train = mnist_tensors(args.data_root, train=True)
    x_test, y_test = mnist_tensors(args.data_root, train=False)
    start = time.perf_counter()
    model = train_classifier(x_train, y_train, epochs=args.epochs, seed=args.seed)
    minutes = (time.perf_counter() - start) / 60
    train_acc, test_acc = accuracy(model, x_train, y_train), accuracy(model, x_test, y_test)
    print(f"{count_parameters(model):,} parameters, {len(x_train):,} training images, {args.epochs} epochs in {minutes:.1f} min")
    print(f"accuracy: train {train_acc:.2%}, test {test_acc:.2%} ({len(x_test):,} images)")
    if test_acc < MIN_ACCURACY:
        print(f"test accuracy below {MIN_ACCURACY:.0%}: not written; train longer (--epochs)", file=sys.stderr)
        return 1
    save_classifier(args.out, model, test_acc, len(x_train))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
