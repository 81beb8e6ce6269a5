"""The project's own files agree with each other: conda and pip pin the same dependencies,
and CI runs the test command the README gives."""

import re
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(sys.version_info < (3, 11), reason="tomllib is Python 3.11+")
def test_environment_yml_pins_the_same_dependencies_as_pyproject():
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    pip_deps = set(project["dependencies"] + project["optional-dependencies"]["test"])
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    pip_section = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    assert "-e ." in pip_section  # the package itself, editable
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
