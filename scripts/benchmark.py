"""What the course costs on this machine: training speed, sampling, the bound, sliders, GIF export and the nbval run.

    DDPM_DATA=../shared/data python scripts/benchmark.py [--skip-nbval] [--out docs/benchmarks.md]
    python scripts/benchmark.py --solvers      # only the cost of each solver, in its own section
    python scripts/benchmark.py --browser      # only the live sampler in headless Chromium, in its own section

Prints a table and writes it, with the machine it was measured on, to docs/benchmarks.md, then
the solvers' section from the same run; the file's other sections (gpu_check's, the browser's) are
kept. Every timing the course quotes comes from this file. With a CUDA GPU, training and sampling
are measured on it too.
"""

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.data import TensorDataset

from ddpm_lib.checkpoint import load_model
from ddpm_lib.denoiser import Denoiser, guided
from ddpm_lib.devices import device_name, fast_bf16
from ddpm_lib.diffusion import DiffusionConfig
from ddpm_lib.files import write_atomic, write_section
from ddpm_lib.guidance import class_blocks
from ddpm_lib.likelihood import variational_bound
from ddpm_lib.noisy_classifier import load_noisy_classifier
from ddpm_lib.sampling import sample, sample_loop
from ddpm_lib.schedules import SCHEDULES, get_schedule
from ddpm_lib.solvers import DDIM, DDPM, DPMSolverPP2M, DPMSolverPP3M, Heun
from ddpm_lib.training import TrainConfig, Trainer
from ddpm_lib.unet import UNetConfig
from ddpm_lib.viz import GuidanceViewer, forward_explorer, save_trajectory_gif, schedule_explorer, trajectory_viewer

ROOT = Path(__file__).resolve().parents[1]
PATCH2 = UNetConfig(patch_size=2, base_channels=32, channel_mults=(1, 2))  # the faster U-Net notebook 4 compares


def train_speed(
    device: str,
    precision: str,
    model_config: UNetConfig | None = None,
    batch_size: int = 128,
    steps: int = 30,
    objective: tuple[DiffusionConfig, dict] = (DiffusionConfig(), {}),
) -> float:
    """Images per second of Trainer.fit for ``model_config`` (default: the default U-Net), data already in memory, with
    ``objective``: a diffusion config and TrainConfig fields (default: the DDPM recipe's)."""
    images = torch.rand(batch_size * 8, 1, 28, 28) * 2 - 1
    config = TrainConfig(batch_size=batch_size, precision=precision, sample_every=0, checkpoint_every=0, **objective[1])
    trainer = Trainer(model_config or UNetConfig(), objective[0], config, TensorDataset(images, torch.zeros(len(images))), device)
    trainer.fit(5, progress=False)  # warm-up: allocations, oneDNN kernels, CUDA context
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    trainer.fit(5 + steps, progress=False)
    return batch_size * steps / (time.perf_counter() - start)


def sampling_seconds(model, diffusion, n: int, solver, device: str, bf16: bool = False, **guide) -> float:
    """Wall time of n samples with ``solver``; ``guide``: labels (moved to the device), guidance, classifier, classifier_scale."""
    denoiser = guided(Denoiser(model.to(device), diffusion, bf16=bf16), **guide)
    sample(denoiser, (n, 1, 28, 28), DDIM(2))  # warm-up
    start = time.perf_counter()
    sample(denoiser, (n, 1, 28, 28), solver, generator=torch.Generator(device))
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


SOLVER_SETTINGS = (  # the quality table's solvers at the step counts it singles out (docs/quality.md)
    ("DDIM 50", DDIM(50)),
    ("DDIM 10", DDIM(10)),
    ("Heun 10", Heun(10)),
    ("DPM-Solver++(2M) 20", DPMSolverPP2M(20)),
    ("DPM-Solver++(3M) 10", DPMSolverPP3M(10)),
)


def solver_costs(checkpoint: str, out: Path, command: str = "scripts/benchmark.py --solvers") -> int:
    """Time 64 samples with each solver of SOLVER_SETTINGS on the CPU; write the table to the "solvers" section of ``out``."""
    model, diffusion = load_model(checkpoint)
    bf16 = fast_bf16(torch.device("cpu"))
    precision = "bf16 autocast" if bf16 else "fp32"
    lines = [
        "## Sampling: what each solver costs",
        "",
        f"Measured by `{command}` on {time.strftime('%Y-%m-%d')}: {device_name('cpu')}, U-Net in {precision}, "
        f"64 images of `{checkpoint}` at once. Their quality is in [quality.md](quality.md).",
        "",
        "| solver | U-Net evals | s for 64 images | ms per image | ms per evaluation and image |",
        "|---|---:|---:|---:|---:|",
    ]
    for label, solver in SOLVER_SETTINGS:
        seconds = sampling_seconds(model, diffusion, 64, solver, "cpu", bf16)
        evals = solver.evaluations(diffusion.make_path())
        lines.append(f"| {label} | {evals} | {seconds:.2f} | {seconds / 64 * 1000:.1f} | {seconds / 64 / evals * 1000:.2f} |")
        print(lines[-1], flush=True)
    write_section(out, "solvers", "\n".join(lines))
    print(f"wrote its section of {out}")
    return 0


OBJECTIVES = {  # the recipes scripts/compare_paths.py compares: (diffusion config, TrainConfig fields)
    "DDPM: VP linear, eps, Min-SNR-5": (DiffusionConfig(), {}),
    "flow matching: linear flow, velocity, uniform s": (
        DiffusionConfig(path="linear_flow", prediction="velocity"),
        {"loss_weighting": "uniform"},
    ),
    "flow matching, logit-normal s": (
        DiffusionConfig(path="linear_flow", prediction="velocity"),
        {"loss_weighting": "uniform", "time_sampling": "logit_normal"},
    ),
}


def objective_costs(out: Path, rounds: int = 3, command: str = "scripts/benchmark.py --objectives") -> int:
    """Time a training step of each of OBJECTIVES on the CPU, in turn, ``rounds`` times (so a change of the machine's
    load falls on all alike); write the table to the "objectives" section of ``out``."""
    speeds = {name: [] for name in OBJECTIVES}
    for _ in range(rounds):
        for name, objective in OBJECTIVES.items():
            speeds[name].append(train_speed("cpu", "auto", objective=objective, steps=15))
    lines = [
        "## Training: what each objective costs",
        "",
        f"Measured by `{command}` on {time.strftime('%Y-%m-%d')}: {device_name('cpu')}, the default U-Net, batch 128, "
        f"precision auto; each objective {rounds} times in turn, 15 steps a time. The objective changes a few elementwise "
        "operations beside the U-Net, so equal steps are equal training time (docs/experiments.md, section 9).",
        "",
        "| objective | ms per step (each round) | images/s (median) |",
        "|---|---:|---:|",
    ]
    for name, values in speeds.items():
        per_step = ", ".join(f"{128_000 / v:.0f}" for v in values)
        lines.append(f"| {name} | {per_step} | {sorted(values)[len(values) // 2]:.0f} |")
        print(lines[-1], flush=True)
    write_section(out, "objectives", "\n".join(lines))
    print(f"wrote its section of {out}")
    return 0


BROWSER_RUNS = [  # what the live sampler's page is timed on: (what, its run() options)
    ("16 digits, 20 DDIM steps, mnist_ddpm", {"model": "mnist_ddpm", "steps": 20}),
    (
        "16 digits of one class, 20 DDIM steps, mnist_cfg, w = 1 (2 x 16 images a step)",
        {"model": "mnist_cfg", "steps": 20, "labels": [7] * 16, "w": 1.0},
    ),
]


def browser_seconds(out: Path) -> int:
    """Time the live sampler (scripts/site_sampler) in headless Chromium; write the "browser" section of ``out``.

    Builds the site, serves it on 127.0.0.1 and runs each of BROWSER_RUNS three times after a warm-up
    (which loads the runtime and the model); the median goes in the table, which make site puts on the page.
    """
    sys.path.insert(0, str(ROOT / "scripts"))
    import build_site
    from headless import ARGS, CHROMIUM, served
    from playwright.sync_api import sync_playwright

    with tempfile.TemporaryDirectory() as tmp:
        site = Path(tmp) / "site"
        build_site.build(site)
        if not (site / "sampler.html").is_file():
            print("the site has no live sampler (npm could not install onnxruntime-web): nothing to time", file=sys.stderr)
            return 1
        pinned = json.loads((ROOT / "scripts" / "site_npm" / "package.json").read_text())["dependencies"]["onnxruntime-web"]
        lines = [
            "## The live sampler in the browser",
            "",
            f"Measured by `scripts/benchmark.py --browser` on {time.strftime('%Y-%m-%d')}: {device_name('cpu')}, headless Chromium, "
            f"onnxruntime-web {pinned} (plain WASM, one thread); the median of three runs after a warm-up.",
            "",
            "| what | seconds |",
            "|---|---:|",
        ]
        with served(site) as base, sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=ARGS)
            page = browser.new_page()
            page.goto(f"{base}/sampler.html")
            timed = """async (o) => { const xT = window.ddpmSampler.gaussian(0, 16 * 784); const start = performance.now();
                await window.ddpmSampler.run({...o, xT}); return (performance.now() - start) / 1000; }"""
            for what, options in BROWSER_RUNS:
                seconds = [page.evaluate(timed, options) for _ in range(4)][1:]
                lines.append(f"| {what} | {statistics.median(seconds):.1f} |")
                print(lines[-1], flush=True)
            browser.close()
    write_section(out, "browser", "\n".join(lines))
    print(f"wrote its section of {out}")
    return 0


def guided_settings(labels: torch.Tensor, device: str) -> list[tuple[str, torch.nn.Module, dict]]:
    """Guided DDIM-50 beside unguided: the class-conditional model at w = 0 (one pass) and w = 2 (a batched pair),
    and the unconditional model with and without the noisy classifier's gradient."""
    cfg, _ = load_model("checkpoints/mnist_cfg.pt")
    uncond, _ = load_model("checkpoints/mnist_ddpm.pt")
    classifier, _ = load_noisy_classifier("checkpoints/mnist_noisy_classifier.pt")
    labels = labels.to(device)
    return [
        ("unconditional mnist_ddpm, unguided", uncond, {}),
        ("mnist_cfg, w = 0 (unguided)", cfg, {"labels": labels, "guidance": 0.0}),
        ("mnist_cfg, w = 2 (classifier-free guidance)", cfg, {"labels": labels, "guidance": 2.0}),
        ("mnist_ddpm + noisy classifier (classifier guidance)", uncond, {"labels": labels, "classifier": classifier.to(device)}),
    ]


def gif_peak_mib(num: int, out: Path) -> float:
    """Peak memory (resident set, MiB) of the CLI writing a GIF of ``num`` digits (DDIM, 10 steps, 10 frames).

    The child reports its own VmHWM: after fork and exec, getrusage's ru_maxrss would still count this large parent.
    """
    code = (
        "import sys; from ddpm_lib.cli import main; status = main(sys.argv[1:]); "
        "print(next(line.split()[1] for line in open('/proc/self/status') if line.startswith('VmHWM'))); sys.exit(status)"
    )
    args = ["gif", "--checkpoint", str(ROOT / "checkpoints/mnist_ddpm.pt"), "--num", str(num), "--sampler", "ddim", "--steps", "10"]
    args += ["--frames", "10", "--out", str(out)]
    result = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, check=True)
    return int(result.stdout.split()[-1]) / 1024  # kB


def slider_ms(viewer, moves: int, rng: random.Random) -> tuple[float, float]:
    """Median and worst milliseconds of kernel time per slider move."""
    times = []
    for _ in range(moves):
        start = time.perf_counter()
        if isinstance(viewer, GuidanceViewer):  # a digit picker and a slider over a list of strengths
            viewer.picker.value, viewer.slider.value = rng.choice(viewer.digits), rng.choice(viewer.strengths)
        else:
            viewer.slider.value = rng.randrange(viewer.slider.min, viewer.slider.max + 1)
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times), max(times)


def nbval_seconds() -> float:
    env = {**os.environ, "DDPM_SMOKE": "1"}
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "pytest", "-q", "--nbval-lax", "notebooks"], cwd=ROOT, env=env, check=True, capture_output=True)
    return time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default="checkpoints/mnist_ddpm.pt")
    parser.add_argument("--skip-nbval", action="store_true", help="do not time the nbval run (about 4 minutes)")
    parser.add_argument("--solvers", action="store_true", help="measure only each solver's cost, into its section of --out")
    parser.add_argument("--objectives", action="store_true", help="time only a training step of each objective, into its section")
    parser.add_argument("--browser", action="store_true", help="time only the site's live sampler in headless Chromium, into its section")
    parser.add_argument("--out", default="docs/benchmarks.md")
    args = parser.parse_args()
    if args.solvers:
        return solver_costs(args.checkpoint, Path(args.out))
    if args.browser:
        return browser_seconds(Path(args.out))
    if args.objectives:
        return objective_costs(Path(args.out))
    rng = random.Random(0)
    torch.manual_seed(0)
    model, diffusion = load_model(args.checkpoint)
    rows = []  # (what, measured)

    def add(what: str, measured: str) -> None:
        rows.append((what, measured))
        print(f"{what:<58} {measured:>22}", flush=True)

    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for device in devices:
        for precision in ("auto", "fp32"):
            name = f"training, default U-Net, batch 128, {device}, precision {precision}"
            add(name, f"{train_speed(device, precision):.0f} images/s")
        name = f"training, patch-2 U-Net (32/64 channels), batch 128, {device}, precision auto"
        add(name, f"{train_speed(device, 'auto', PATCH2):.0f} images/s")
        for bf16 in (False, True):
            seconds = sampling_seconds(model, diffusion, 64, DDIM(50), device, bf16)
            name = f"DDIM 50 steps, 64 images, {device}, {'bf16 autocast' if bf16 else 'fp32'}"
            add(name, f"{seconds:.2f} s ({seconds / 64 * 1000:.1f} ms per image, {seconds / 64 / 50 * 1000:.2f} ms/img/step)")
        labels = class_blocks(list(range(10)), 64)
        bf16 = fast_bf16(torch.device(device))  # as the course samples on this device
        for what, guided_model, guide in guided_settings(labels, device):
            seconds = sampling_seconds(guided_model, diffusion, 64, DDIM(50), device, bf16, **guide)
            add(
                f"DDIM 50 steps, 64 images, {device}, {'bf16 autocast' if bf16 else 'fp32'}, {what}",
                f"{seconds / 64 * 1000:.1f} ms per image",
            )
        x0 = torch.randint(0, 256, (100, 1, 28, 28)) / 127.5 - 1  # the bound costs the same on any 100 images
        start = time.perf_counter()
        variational_bound(model.to(device), x0, diffusion.make_schedule(), diffusion.prediction, torch.Generator().manual_seed(0))
        add(f"variational bound (nll), 1000 steps, 100 images, {device}, fp32", f"{(time.perf_counter() - start) / 100:.2f} s per image")
    model = model.cpu()

    x0 = torch.rand(8, 1, 28, 28) * 2 - 1
    linear = get_schedule("linear", 1000)
    trajectory = list(sample_loop(guided(Denoiser(model, diffusion)), (16, 1, 28, 28), DDIM(100)))
    viewers = {
        "slider: forward_explorer (notebook 1)": forward_explorer(x0, linear),
        "slider: schedule_explorer (notebook 2)": schedule_explorer(x0[:1], {n: get_schedule(n, 1000) for n in SCHEDULES}),
        "slider: trajectory_viewer (notebook 6)": trajectory_viewer(trajectory, nrow=4),
        "digit picker and w slider: GuidanceViewer (notebook 8)": GuidanceViewer(
            {(d, w): torch.rand(8, 1, 28, 28) * 2 - 1 for d in range(10) for w in (0, 0.5, 1, 2, 4, 8)}, nrow=8
        ),
    }
    for name, viewer in viewers.items():
        median, worst = slider_ms(viewer, 50, rng)
        add(name, f"{median:.1f} ms median, {worst:.1f} ms worst")

    generator = torch.Generator().manual_seed(0)
    bf16 = fast_bf16(torch.device("cpu"))  # only to draw the trajectory faster; the export is what is timed
    trajectory = list(sample_loop(guided(Denoiser(model, diffusion, bf16=bf16)), (64, 1, 28, 28), DDPM(), generator=generator))
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        path = save_trajectory_gif(trajectory, Path(tmp) / "reverse.gif")
        seconds = time.perf_counter() - start
        add("GIF export: 64 digits, 1000-step DDPM run, 60 frames", f"{seconds:.2f} s, {path.stat().st_size / 2**20:.2f} MB")

    with tempfile.TemporaryDirectory() as tmp:
        small, large = (gif_peak_mib(n, Path(tmp) / "x.gif") for n in (64, 4096))
        add("GIF export from the CLI, peak memory: 64 digits / 4096 digits", f"{small:.0f} MiB / {large:.0f} MiB")

    if not args.skip_nbval:
        add("nbval run of all notebooks, quick mode (DDPM_SMOKE=1)", f"{nbval_seconds() / 60:.1f} min")

    gpu = f"; GPU: {device_name('cuda')}" if torch.cuda.is_available() else "; no GPU"
    header = (
        "# Benchmarks\n\n"
        f"Measured by one run of `make benchmark` (`scripts/benchmark.py`) on {time.strftime('%Y-%m-%d')}: {device_name('cpu')}"
        f"{gpu}; torch {torch.__version__}. Nothing else ran on the machine meanwhile. Every timing the course "
        "quotes is from this page: the table, and the solvers' section below from the same run.\n\n"
        "| what | measured |\n|---|---:|\n"
    )
    out = Path(args.out)
    old = out.read_text() if out.exists() else ""
    sections = old[old.index("<!-- ") :] if "<!-- " in old else ""  # the solvers' and gpu_check's, kept as they are
    table = header + "".join(f"| {w} | {m} |\n" for w, m in rows)
    write_atomic(out, (table + ("\n" + sections if sections else "")).encode())
    print(f"wrote {args.out}")
    return solver_costs(args.checkpoint, out, "make benchmark")


if __name__ == "__main__":
    sys.exit(main())
