"""The GPU check (make gpu-check): everything the course promises on a GPU, run and measured in one go.

    PYTHONPATH=. python3 scripts/gpu_check.py                 # on the GPU machine, about 6 minutes
    python scripts/gpu_check.py --device cpu --tiny            # the same code path on a CPU, in seconds

1. the device, the driver, torch and CUDA;
2. the GPU tests (tests/test_gpu.py: training, sampling, exact resume and bf16 on CUDA);
3. training images/s of the default U-Net at batch 128 and 512 (bf16), and DDIM-50 of 1,000 digits;
4. the shipped recipe trained for --train-minutes with snapshots, scored as scripts/time_to_quality.py does;
5. torchrun on every visible GPU for a few hundred steps, and the scaling;
6. a GPU section in docs/benchmarks.md, docs/gpu_check.json, and a summary.

Written for a bare machine: its own python3 (PyTorch 2.11 or newer), no virtual environment, no
JupyterLab or ipywidgets, MNIST in ./data (or $DDPM_DATA), nothing to install. Each stage's
result is written to docs/gpu_check.json as soon as it is measured, so a check cut short keeps
what it had. Without a CUDA GPU (and without --device cpu) it says so and exits with status 0.
"""

import argparse
import json
import os
import platform
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

try:
    import torch
except ImportError:
    sys.exit(f"{sys.executable} has no PyTorch: run the check with a Python that has it (make gpu-check GPU_PYTHON=...)")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the library from this tree, with any python3

from ddpm_lib.checkpoint import load_checkpoint  # noqa: E402
from ddpm_lib.denoiser import Denoiser  # noqa: E402
from ddpm_lib.devices import device_name  # noqa: E402
from ddpm_lib.diffusion import DiffusionConfig  # noqa: E402
from ddpm_lib.files import write_atomic, write_section  # noqa: E402
from ddpm_lib.sampling import sample  # noqa: E402
from ddpm_lib.solvers import DDIM  # noqa: E402
from ddpm_lib.training import TrainConfig, Trainer  # noqa: E402
from ddpm_lib.unet import UNetConfig  # noqa: E402

TINY_FLAGS = ["--base-channels", "8", "--channel-mults", "1,2", "--num-res-blocks", "1", "--attention-resolutions", ""]
SECTION = "gpu-check"  # its section of docs/benchmarks.md (files.write_section)


class Report:
    """The results so far, kept in a JSON file that is rewritten (atomically) after every stage."""

    def __init__(self, path: Path):
        self.path, self.results = path, {}

    def __setitem__(self, key: str, value) -> None:
        self.results[key] = value
        write_atomic(self.path, (json.dumps(self.results, indent=1) + "\n").encode())

    def __getitem__(self, key: str):
        return self.results[key]


def stage(title: str) -> float:
    print(f"\n== {title}", flush=True)
    return time.perf_counter()


def environment(device: torch.device) -> dict:
    info = {"device": device_name(device), "torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version()}
    info["precision"] = precision(device)
    if device.type == "cuda":
        try:
            query = ["nvidia-smi", "--query-gpu=driver_version,memory.total", "--format=csv,noheader"]
            info["driver"] = subprocess.run(query, capture_output=True, text=True, timeout=30).stdout.strip().splitlines()[0]
        except (OSError, IndexError, subprocess.SubprocessError):
            info["driver"] = "unknown (no nvidia-smi)"
        info["gpus"] = torch.cuda.device_count()
    return info


def gpu_tests() -> dict:
    start = time.perf_counter()
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_gpu.py"]
    env = {**os.environ, "PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1"}  # pytest alone: the GPU machine has no notebook plugins
    run = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, env=env)
    print(run.stdout[-2000:], run.stderr[-2000:], sep="")
    summary = run.stdout.strip().splitlines()[-1] if run.stdout.strip() else "no output"
    return {"status": run.returncode, "summary": summary, "seconds": round(time.perf_counter() - start, 1)}


def precision(device: torch.device) -> str:
    """bf16 on the GPU; fp32 on a CPU, where the check only walks its code path (--tiny) and not every CPU runs bf16 fast."""
    return "bf16" if device.type == "cuda" else "fp32"


def training_speed(device: torch.device, batch: int, tiny: bool, data_root: str | None) -> dict:
    """Images/s of optimizer steps of the default U-Net on MNIST, bf16, after a warm-up."""
    model = UNetConfig(base_channels=8, channel_mults=(1, 2), num_res_blocks=1, attention_resolutions=()) if tiny else UNetConfig()
    warm, timed = (2, 3) if tiny else (30, 200)
    config = TrainConfig(batch_size=batch, steps=warm + timed, precision=precision(device), sample_every=0, checkpoint_every=0)
    trainer = Trainer(model, DiffusionConfig(), config, device=device, data_root=data_root)
    trainer.fit(warm, progress=False)
    _sync(device)
    start = time.perf_counter()
    trainer.fit(warm + timed, progress=False)
    _sync(device)
    seconds = time.perf_counter() - start
    return {"batch": batch, "images_per_s": round(timed * batch / seconds), "ms_per_step": round(1000 * seconds / timed, 2)}


def sampling_speed(device: torch.device, tiny: bool) -> dict:
    """DDIM-50 of 1,000 digits from the shipped model, bf16, in batches of 500."""
    n, batch = (8, 8) if tiny else (1000, 500)
    denoiser = Denoiser.from_checkpoint(ROOT / "checkpoints" / "mnist_ddpm.pt", device, bf16=precision(device) == "bf16")
    generator = torch.Generator().manual_seed(0)
    sample(denoiser, (batch, 1, 28, 28), DDIM(50), generator=generator)  # warm-up
    _sync(device)
    start = time.perf_counter()
    for _ in range(n // batch):
        sample(denoiser, (batch, 1, 28, 28), DDIM(50), generator=generator)
    _sync(device)
    seconds = time.perf_counter() - start
    return {"images": n, "seconds": round(seconds, 2), "ms_per_image": round(1000 * seconds / n, 3)}


def time_to_quality(device: torch.device, minutes: float, tiny: bool, data_root: str | None, runs: Path) -> dict:
    """Train the shipped recipe with snapshots for ``minutes`` (a Ctrl-C then saves it), then score the snapshots."""
    out = runs / "recipe.pt"
    every = "2" if tiny else "2000"
    command = [sys.executable, "-m", "ddpm_lib", "train", "--dataset", "mnist", "--snapshot-every", every, "--out", str(out)]
    command += [
        "--device",
        str(device),
        *(["--data-root", data_root] if data_root else []),
        *(TINY_FLAGS + ["--steps", "6"] if tiny else []),
    ]
    train = subprocess.Popen(command, cwd=ROOT, stderr=subprocess.PIPE, text=True)
    try:
        train.wait(timeout=minutes * 60)
    except subprocess.TimeoutExpired:
        train.send_signal(signal.SIGINT)  # the CLI saves at the next step boundary and exits 130
    err = train.communicate()[1]
    if train.returncode not in (0, 130):
        raise RuntimeError(f"the recipe's training failed ({train.returncode}): {err.strip().splitlines()[-1:]}")
    state = load_checkpoint(out)
    score = [sys.executable, "scripts/time_to_quality.py", str(out), "--device", str(device), "--cache", str(runs / "quality.json")]
    score += ["--num", "16" if tiny else "1000", *(["--data-root", data_root] if data_root else [])]
    scored = subprocess.run(score, cwd=ROOT, capture_output=True, text=True)
    print(scored.stdout, scored.stderr[-1000:], sep="")
    found = re.search(r"time to quality: ([0-9.]+) min", scored.stdout)
    rows = [line for line in scored.stdout.splitlines() if "_step" in line]
    return {
        "steps": state["step"],
        "train_minutes": round(state["train_seconds"] / 60, 2),
        "images_per_s": round(state["step"] * state["train_config"]["batch_size"] / state["train_seconds"]),
        "time_to_quality_minutes": float(found.group(1)) if found else None,
        "best_row": rows[-1] if rows else None,
        "scored": scored.returncode in (0, 1),
    }


def torchrun_scaling(device: torch.device, tiny: bool, data_root: str | None, runs: Path, single: float) -> dict:
    """A few hundred steps under torchrun on every visible GPU, at 128 images per GPU, against one GPU's images/s."""
    ranks = torch.cuda.device_count() if device.type == "cuda" else 2
    out = runs / "torchrun.pt"
    steps = "4" if tiny else "300"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}", "-m", "ddpm_lib", "train"]
    command += ["--dataset", "mnist", "--steps", steps, "--batch-size", str(128 * ranks), "--sample-every", "0"]
    command += ["--precision", precision(device)]
    command += [
        "--device",
        device.type,
        "--out",
        str(out),
        *(["--data-root", data_root] if data_root else []),
        *(TINY_FLAGS if tiny else []),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, env=env, timeout=600)
    if run.returncode:
        raise RuntimeError(f"torchrun failed ({run.returncode}): {run.stderr.strip().splitlines()[-3:]}")
    state = load_checkpoint(out)
    rate = state["step"] * state["train_config"]["batch_size"] / state["train_seconds"]
    return {"ranks": ranks, "images_per_s": round(rate), "per_rank": round(rate / ranks), "efficiency": round(rate / (ranks * single), 2)}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def markdown(r: dict) -> str:
    env = r["environment"]
    lines = ["## GPU", "", f"Measured by `make gpu-check` on {r['date']}: {env['device']}, driver {env.get('driver', '-')},"]
    lines += [f"torch {env['torch']} (CUDA {env['cuda']}), Python {env['python']}; {r['wall_minutes']} minutes in all.", ""]
    lines += ["| what | measured |", "|---|---:|"]
    if "tests" in r:
        lines.append(f"| GPU tests (tests/test_gpu.py) | {r['tests']['summary']} |")
    for t in r.get("training", []):
        lines.append(
            f"| training, default U-Net, batch {t['batch']}, {env['precision']} "
            f"| {t['images_per_s']:,} images/s ({t['ms_per_step']} ms a step) |"
        )
    if "sampling" in r:
        s = r["sampling"]
        lines.append(f"| DDIM 50 steps, {s['images']:,} digits, {env['precision']} | {s['seconds']} s ({s['ms_per_image']} ms an image) |")
    if "quality" in r:
        q = r["quality"]
        reached = (
            f"{q['time_to_quality_minutes']} min" if q["time_to_quality_minutes"] is not None else f"not within {q['train_minutes']} min"
        )
        recipe = f"the shipped recipe: {q['steps']:,} steps in {q['train_minutes']} min ({q['images_per_s']:,} images/s)"
        lines.append(f"| {recipe} | time to quality: {reached} |")
    if "torchrun" in r:
        d = r["torchrun"]
        lines.append(
            f"| torchrun, {d['ranks']} rank(s), 128 images each | {d['images_per_s']:,} images/s, {d['efficiency']:.0%} of linear scaling |"
        )
    for key, error in r.get("errors", {}).items():
        lines.append(f"| {key} | failed: {error} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", help="cuda (the default) or cpu, to try the check's code path")
    parser.add_argument("--tiny", action="store_true", help="tiny models and a few steps: checks the code path, measures nothing")
    parser.add_argument("--train-minutes", type=float, default=3.0, help="how long the shipped recipe trains (default: 3)")
    parser.add_argument(
        "--data-root", default=os.environ.get("DDPM_DATA") or str(ROOT / "data"), help="MNIST's folder (default: $DDPM_DATA, else ./data)"
    )
    parser.add_argument("--docs", type=Path, default=ROOT / "docs", help="where benchmarks.md and gpu_check.json are (default: docs/)")
    parser.add_argument(
        "--runs", type=Path, default=ROOT / "runs" / "gpu_check", help="scratch folder for the runs (default: runs/gpu_check/)"
    )
    args = parser.parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print(
            f"no CUDA GPU is visible here (torch {torch.__version__}, CUDA {torch.version.cuda}): nothing to check; run it on a GPU machine"
        )
        return 0
    device = torch.device(args.device)
    args.runs.mkdir(parents=True, exist_ok=True)
    for old in args.runs.glob("*"):  # a fresh run each time: the recipe must not resume an earlier one
        old.unlink()
    report = Report(args.docs / "gpu_check.json")
    began = time.perf_counter()
    report["date"] = time.strftime("%Y-%m-%d")
    stage("1. the machine")
    report["environment"] = environment(device)
    batches = (16, 64) if args.tiny else (128, 512)  # --tiny walks the code path; its numbers mean nothing
    print(json.dumps(report["environment"], indent=1))
    errors = {}
    stages = [
        ("tests", "2. the GPU tests", gpu_tests),
        ("training", "3. training and sampling speed", lambda: [training_speed(device, b, args.tiny, args.data_root) for b in batches]),
        ("sampling", "3. DDIM-50 of 1,000 digits", lambda: sampling_speed(device, args.tiny)),
        (
            "quality",
            "4. the shipped recipe and its time to quality",
            lambda: time_to_quality(device, args.train_minutes, args.tiny, args.data_root, args.runs),
        ),
    ]
    for key, title, run in stages:
        start = stage(title)
        try:
            report[key] = run()
        except Exception as e:  # the other stages still run; the report says what failed
            errors[key] = " ".join(str(e).split())[:300]
            report["errors"] = errors
        print(f"{key}: {report.results.get(key, 'failed: ' + errors.get(key, ''))} ({time.perf_counter() - start:.0f} s)", flush=True)
    start = stage("5. torchrun on every visible GPU")
    try:
        single = report["training"][0]["images_per_s"] if "training" in report.results else 1.0
        report["torchrun"] = torchrun_scaling(device, args.tiny, args.data_root, args.runs, single)
    except Exception as e:
        errors["torchrun"] = " ".join(str(e).split())[:300]
        report["errors"] = errors
    print(f"torchrun: {report.results.get('torchrun', 'failed')} ({time.perf_counter() - start:.0f} s)")
    report["wall_minutes"] = round((time.perf_counter() - began) / 60, 1)
    stage("6. docs/benchmarks.md")
    section = markdown(report.results)
    write_section(args.docs / "benchmarks.md", SECTION, section)
    print(section)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
