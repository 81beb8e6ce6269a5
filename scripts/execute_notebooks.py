"""Run notebooks top to bottom and save them with their outputs, as they are committed.

    python scripts/execute_notebooks.py                    # every notebook, in order
    python scripts/execute_notebooks.py notebooks/06_sampling.ipynb

Each runs in its own folder (notebooks/), in full mode unless DDPM_SMOKE=1. The widgets' state is
stored (renderers without a kernel then draw training's finished progress bar), except for the
slider viewers': their outputs carry a kernel-free version of their own, which renderers show only
when the widget itself cannot be drawn. Cells keep no execution timestamps.
"""

import argparse
import json
import re
import sys
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient

from ddpm_lib.files import write_atomic

ROOT = Path(__file__).resolve().parents[1]
VIEW, STATE = "application/vnd.jupyter.widget-view+json", "application/vnd.jupyter.widget-state+json"


def drop_viewer_state(nb: nbformat.NotebookNode) -> None:
    """Remove the stored state of every widget behind an output with a kernel-free scrubber, and of its children."""
    state = nb.metadata.get("widgets", {}).get(STATE, {}).get("state", {})
    outputs = [output for cell in nb.cells for output in cell.get("outputs", [])]
    todo = [o.data[VIEW]["model_id"] for o in outputs if VIEW in o.get("data", {}) and "ddpm-scrubber" in o.data.get("text/html", "")]
    while todo:
        model = state.pop(todo.pop(), None)
        if model is not None:
            todo += re.findall(r"IPY_MODEL_([0-9a-f]+)", json.dumps(model))
    if not state:
        nb.metadata.pop("widgets", None)


def drop_timestamps(nb: nbformat.NotebookNode) -> None:
    """Remove each cell's execution timestamps: they change at every run and say nothing to a reader."""
    for cell in nb.cells:
        cell.get("metadata", {}).pop("execution", None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("notebooks", nargs="*", type=Path, help="default: every notebook in notebooks/")
    paths = parser.parse_args().notebooks or sorted((ROOT / "notebooks").glob("*.ipynb"))
    for path in paths:
        start = time.perf_counter()
        nb = nbformat.read(path, as_version=4)
        NotebookClient(nb, timeout=None, resources={"metadata": {"path": str(path.parent)}}).execute()
        drop_viewer_state(nb)
        drop_timestamps(nb)
        write_atomic(path, nbformat.writes(nb).encode() + b"\n")
        print(f"{path.name}: {time.perf_counter() - start:.0f} s", file=sys.stderr)


if __name__ == "__main__":
    main()
