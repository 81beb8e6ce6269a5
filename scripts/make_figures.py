"""Regenerate the README's pictures in figures/ from the shipped checkpoint.

    make figures        (or: python scripts/make_figures.py)

Writes forward_process.png, schedules.png, samples.png (100 DDPM samples) and
reverse_diffusion.gif (16 samples, x_t beside the predicted x0), the U-Net under bf16 autocast
where the hardware runs it fast. Needs MNIST under the data root. (figures/quality_vs_steps.png
comes from `make evaluate`.)
"""

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from ddpm_lib.data import get_dataset  # noqa: E402
from ddpm_lib.denoiser import Denoiser  # noqa: E402
from ddpm_lib.devices import default_device, fast_bf16  # noqa: E402
from ddpm_lib.diffusion import q_sample  # noqa: E402
from ddpm_lib.sampling import sample, sample_loop  # noqa: E402
from ddpm_lib.schedules import SCHEDULES, get_schedule  # noqa: E402
from ddpm_lib.solvers import DDPM  # noqa: E402
from ddpm_lib.viz import image_grid, save_grid, save_trajectory_gif  # noqa: E402


def forward_strip(out: Path) -> None:
    mnist = get_dataset("mnist", train=False)
    x0 = torch.stack([mnist[i][0] for i in range(5)])
    schedule = get_schedule("linear", 1000)
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(0))
    ts = [0, 100, 200, 300, 500, 700, 999]
    fig, axes = plt.subplots(1, len(ts), figsize=(1.6 * len(ts), 6.2))
    for ax, t in zip(axes, ts, strict=True):
        ax.imshow(image_grid(q_sample(x0, t, schedule, noise), nrow=1), cmap="gray")
        ax.set_title(f"t = {t}")
        ax.axis("off")
    fig.suptitle("the forward process q(x_t | x_0), linear schedule, T = 1000")
    fig.savefig(out / "forward_process.png", dpi=80, bbox_inches="tight")
    plt.close(fig)


def schedule_plot(out: Path) -> None:
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.2))
    for name in SCHEDULES:
        s = get_schedule(name, 1000)
        axes[0].plot(s.alpha_bar, label=name)
        axes[1].plot(s.snr.log(), label=name)
    axes[0].set(title="alpha_bar_t", xlabel="t")
    axes[1].set(title="log SNR", xlabel="t")
    axes[0].legend()
    fig.savefig(out / "schedules.png", dpi=80, bbox_inches="tight")
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default="checkpoints/mnist_ddpm.pt")
    parser.add_argument("--out", default="figures")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(exist_ok=True)
    forward_strip(out)
    schedule_plot(out)
    device = default_device()
    denoiser = Denoiser.from_checkpoint(args.checkpoint, device, bf16=fast_bf16(device))  # x0 clipped, as sample draws
    x = sample(denoiser, (100, 1, 28, 28), DDPM(), generator=torch.Generator().manual_seed(0))
    save_grid(x, out / "samples.png", nrow=10)
    steps = sample_loop(denoiser, (16, 1, 28, 28), DDPM(), generator=torch.Generator().manual_seed(1))
    save_trajectory_gif(
        steps, out / "reverse_diffusion.gif", num_steps=len(DDPM().grid(denoiser.path)), frames=50, duration_ms=70, hold_ms=2000
    )
    print(f"wrote {', '.join(sorted(p.name for p in out.iterdir()))} in {out}/")


if __name__ == "__main__":
    main()
