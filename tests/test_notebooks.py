"""What every committed notebook must be: small, in one notation, without project plumbing."""

import json
import re
from pathlib import Path

import pytest

NOTEBOOKS = sorted((Path(__file__).parent.parent / "notebooks").glob("*.ipynb"))
MATH = re.compile(r"\$\$([^$]+)\$\$|(?<!\$)\$(?!\$)([^$]+)\$")
# Code indices in a formula: 999 (not 0.999), T - 1, a range from 0, t = 0 or t = -1. Formulas count steps from 1.
CODE_INDEX = re.compile(r"(?<![\d.])999\b|T\s*-\s*1\b|\{\s*0\s*,|\bt\s*=\s*0\b|\bt\s*=\s*-\s*1")


def markdown(path: Path) -> list[str]:
    return ["".join(cell["source"]) for cell in json.loads(path.read_text())["cells"] if cell["cell_type"] == "markdown"]


def test_every_notebook_is_under_2_mb_and_the_course_under_10_mb():
    sizes = {path.name: path.stat().st_size for path in NOTEBOOKS}
    assert all(size < 2_000_000 for size in sizes.values()), sizes
    assert sum(sizes.values()) < 12_000_000, sizes


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_formulas_count_timesteps_from_1_and_code_indices_stay_in_code_font(path):
    found = [m.group(1) or m.group(2) for text in markdown(path) for m in MATH.finditer(text)]
    assert [f for f in found if CODE_INDEX.search(f)] == [], "write the paper's t (1 ... T) in $...$, code indices as `t = 999`"


def test_the_notation_check_catches_what_it_names():
    hits = [f for f in ("t = 999", r"\bar\alpha_{T-1}", r"\{0, \dots, T-1\}", "t = 0", "t = -1") if CODE_INDEX.search(f)]
    assert len(hits) == 5
    assert not any(CODE_INDEX.search(f) for f in ("d = 0.999", r"\bar\alpha_T", "t = 1", r"\{1, \dots, T\}", "t = 10"))


# What a student should never read: the test suite's switch, CI, and pass/fail language.
PLUMBING = re.compile(r"NBVAL_|make gpu-check|DDPM_SMOKE|\bCI\b|target:")


def sources(path: Path) -> list[str]:
    return ["".join(cell["source"]) for cell in json.loads(path.read_text())["cells"]]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_no_notebook_shows_the_reader_project_plumbing(path):
    assert "NBVAL_" not in path.read_text()
    assert [m.group(0) for text in sources(path) for m in PLUMBING.finditer(text)] == []


def test_the_plumbing_check_catches_what_it_names():
    hits = [s for s in ('os.environ.get("DDPM_SMOKE")', "# CI runs it", 'label="target: 90%"', "make gpu-check") if PLUMBING.search(s)]
    assert len(hits) == 4
    assert not any(PLUMBING.search(s) for s in ("CIFAR-10", "tilted target, mean", "the targets of a classifier"))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_quick_mode_is_one_switch_read_through_the_course_s_run_sizes(path):
    code = [text for text, cell in zip(sources(path), json.loads(path.read_text())["cells"], strict=True) if cell["cell_type"] == "code"]
    calls = sum(text.count("run_sizes(") for text in code)
    assert calls <= 1 and not any("os.environ" in text for text in code), "one run_sizes(full=..., quick=...) call, no environment reads"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_every_notebook_opens_with_its_running_time_on_2_cpu_cores(path):
    first = "".join(json.loads(path.read_text())["cells"][0]["source"])
    assert re.search(r"\*Running time: (under a minute|about \d+ minutes?) on 2 CPU cores", first), first[:300]
