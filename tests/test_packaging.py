"""The project's own files agree with each other: conda and pip pin the same dependencies,
and CI runs the test command the README gives."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from ddpm_lib.solvers import solver_table

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(sys.version_info < (3, 11), reason="tomllib is Python 3.11+")
def test_environment_yml_pins_the_same_dependencies_as_pyproject():
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    pip_deps = set(project["dependencies"] + extras["course"] + extras["test"] + extras["onnx"])
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    pip_section = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    assert "-e .[course]" in pip_section  # the package itself, editable, with the course's extra
    assert {d for d in pip_section if not d.startswith("-e")} == pip_deps  # same names and version pins
    assert "torch>=2.14" in pip_deps
    python = next(d for d in env["dependencies"] if isinstance(d, str) and d.startswith("python"))
    assert python.startswith("python=3.1")


def test_ci_runs_the_test_command_the_readme_gives():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    commands = re.findall(r"^make (\w+)$", readme, flags=re.M)
    assert "test" in commands and "lab" in commands
    assert re.search(r"^make test$", ci, flags=re.M)
    assert "DDPM_DATA=" in ci and "../shared/data" in ci


@pytest.mark.skipif(sys.version_info < (3, 11), reason="tomllib is Python 3.11+")
def test_the_library_installs_without_jupyterlab_and_the_course_installs_it():
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    names = {re.split(r"[<>=\[ ]", d)[0] for d in project["dependencies"]}
    assert names.isdisjoint({"jupyterlab", "ipywidgets", "nbval", "notebook"})  # pip install . : the library and its CLI
    assert {"jupyterlab", "ipywidgets"} <= set(project["optional-dependencies"]["course"])
    makefile = (ROOT / "Makefile").read_text()
    assert 'pip install --quiet -e ".[course,test,onnx]"' in makefile  # what make lab and make test set up


def test_the_library_and_its_cli_run_without_jupyter_installed():
    hide = (
        "import sys\n"
        "class Hide:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in {'ipywidgets', 'IPython', 'jupyterlab', 'notebook', 'nbformat'}:\n"
        "            raise ImportError(f'{name} is hidden')\n"
        "sys.meta_path.insert(0, Hide())\n"
        "import importlib, pkgutil, ddpm_lib\n"
        "for m in pkgutil.iter_modules(ddpm_lib.__path__):\n"
        "    if m.name != '__main__':\n"
        "        importlib.import_module('ddpm_lib.' + m.name)\n"
        "from ddpm_lib.cli import main\n"
        "sys.argv = ['ddpm_lib', '--help']\n"
        "main()\n"
    )
    run = subprocess.run([sys.executable, "-c", hide], capture_output=True, text=True, cwd=ROOT)
    assert run.returncode == 0, run.stderr
    assert "train" in run.stdout and "sample" in run.stdout


def test_the_command_line_starts_without_importing_torchvision():
    # torchvision costs about 2.5 s to import; only reading a dataset or drawing a grid needs it (ddpm_lib.data)
    code = "import sys, ddpm_lib.cli, ddpm_lib.generate, ddpm_lib.training; print('torchvision' in sys.modules)"
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert run.returncode == 0 and run.stdout.strip() == "False", run.stdout + run.stderr


@pytest.mark.parametrize("user_id, flag", [("0", True), ("1000", False)])
def test_make_lab_allows_root_exactly_when_run_as_root(user_id, flag):
    run = subprocess.run(["make", "-n", "lab", f"USER_ID={user_id}"], capture_output=True, text=True, cwd=ROOT, check=True)
    lab = next(line for line in run.stdout.splitlines() if "jupyter lab" in line)
    assert ("--allow-root" in lab) is flag
    default = subprocess.run(["make", "-n", "lab"], capture_output=True, text=True, cwd=ROOT, check=True).stdout
    assert ("--allow-root" in default) is (os.geteuid() == 0)


def test_the_readme_is_a_front_page_of_at_most_12000_characters():
    assert len((ROOT / "README.md").read_text()) <= 12_000  # the experiments live in docs/


def table(text: str, heading: str, after: str = "") -> dict[str, list[str]]:
    """The first Markdown table in ``text`` (after the line ``after``) whose header row starts with ``| heading |``:
    {first cell: the other cells}."""
    start = text.index(f"| {heading} |", text.index(after) if after else 0)
    end = text.find("\n\n", start)
    rows = {}
    for line in text[start : end if end >= 0 else None].splitlines()[2:]:  # after the header and rule rows
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        rows[cells[0]] = cells[1:]
    return rows


def readme_table(heading: str) -> dict[str, list[str]]:
    return table((ROOT / "README.md").read_text(), heading)


def test_the_readme_quotes_quality_as_docs_quality_md_has_it():
    measured = table((ROOT / "docs" / "quality.md").read_text(), "sampler")
    quoted = readme_table("sampler")
    assert len(quoted) >= 4
    for label, cells in quoted.items():
        assert measured[label.removesuffix(" (fp32)")][: len(cells)] == cells, label


def test_the_readme_quotes_the_comparisons_across_seeds_as_docs_quality_md_has_them():
    measured = table((ROOT / "docs" / "quality.md").read_text(), "sampler", after="## Across seeds")
    quoted = readme_table("sampler, 3 seeds")
    assert len(quoted) >= 4
    for label, cells in quoted.items():
        assert measured[label][: len(cells)] == cells, label


def test_the_readme_quotes_speed_as_docs_benchmarks_md_has_it():
    measured = table((ROOT / "docs" / "benchmarks.md").read_text(), "what")
    quoted = readme_table("what")
    assert len(quoted) >= 4
    for what, cells in quoted.items():
        assert measured[what] == cells, what


def test_the_readme_quotes_guidance_as_docs_guidance_md_has_it():
    measured = table((ROOT / "docs" / "guidance.md").read_text(), "guidance")
    quoted = readme_table("guidance")
    assert len(quoted) >= 3
    for label, cells in quoted.items():
        strength = re.search(r"[ws] = [\d.]+", label).group(0)  # the guidance.md row: "w = 1", "s = 4"
        assert measured[strength][:3] == cells, label  # asked digit drawn, confident, class-wise FD


def test_docs_cli_md_lists_the_solvers_as_their_registry_has_them():
    assert solver_table() in (ROOT / "docs" / "cli.md").read_text()  # paste ddpm_lib.solvers.solver_table() there
