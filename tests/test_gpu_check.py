"""scripts/gpu_check.py on a CPU: its whole code path in a tiny configuration, with Jupyter hidden."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Installed as sitecustomize in every Python process of the check (the CLI, torchrun's ranks, pytest):
# the GPU machine has no JupyterLab or ipywidgets, so the library must never import them.
HIDE = """import sys
class Hide:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {"ipywidgets", "IPython", "jupyterlab", "notebook", "nbformat", "nbconvert"}:
            raise ImportError(f"{name} is hidden: the GPU machine has no Jupyter")
sys.meta_path.insert(0, Hide())
"""


def test_without_cuda_make_gpu_check_says_so_and_exits_cleanly():
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    run = subprocess.run(["make", "gpu-check", f"GPU_PYTHON={sys.executable}"], cwd=ROOT, capture_output=True, text=True, env=env)
    assert run.returncode == 0, run.stderr
    assert "no CUDA GPU is visible here" in run.stdout and "nothing to check" in run.stdout


def test_the_check_runs_through_on_a_cpu_with_no_jupyter_installed(tmp_path):
    (tmp_path / "hide").mkdir()
    (tmp_path / "hide" / "sitecustomize.py").write_text(HIDE)
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "benchmarks.md").write_text("# Benchmarks\n\nthe CPU rows\n")
    env = {**os.environ, "PYTHONPATH": f"{tmp_path / 'hide'}{os.pathsep}{ROOT}", "CUDA_VISIBLE_DEVICES": ""}
    command = [sys.executable, "scripts/gpu_check.py", "--device", "cpu", "--tiny", "--train-minutes", "2"]
    command += ["--docs", str(docs), "--runs", str(tmp_path / "runs")]
    run = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, env=env, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    report = json.loads((docs / "gpu_check.json").read_text())
    assert "errors" not in report, report
    assert report["tests"]["status"] == 0 and "skipped" in report["tests"]["summary"]  # no GPU: the GPU tests skip
    assert [t["batch"] for t in report["training"]] == [16, 64] and report["training"][0]["images_per_s"] > 0
    assert report["sampling"]["ms_per_image"] > 0 and report["quality"]["steps"] == 6 and report["quality"]["scored"]
    assert report["torchrun"]["ranks"] == 2 and report["torchrun"]["images_per_s"] > 0
    benchmarks = (docs / "benchmarks.md").read_text()
    assert benchmarks.startswith("# Benchmarks\n\nthe CPU rows\n") and "## GPU" in benchmarks and "torchrun, 2 rank(s)" in benchmarks
