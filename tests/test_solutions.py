import json
import re
from pathlib import Path

import pytest

from ddpm_lib import exercises, solutions
from ddpm_lib.exercises import FoldedSolution, reveal

NOTEBOOKS = sorted((Path(__file__).parent.parent / "notebooks").glob("*.ipynb"))
PAIRS = {
    "check_q_sample": "q_sample_solution",
    "check_alpha_bar": "alpha_bar_solution",
    "check_q_posterior_mean": "posterior_mean_solution",
    "check_timestep_embedding": "timestep_embedding_solution",
    "check_loss_simple": "loss_simple_solution",
    "check_ddpm_step": "ddpm_step_solution",
    "check_ddim_step": "ddim_step_solution",
    "check_frechet_distance": "frechet_distance_solution",
    "check_guided_eps": "guided_eps_solution",
    "check_heun_step": "heun_step_solution",
    "check_flow_matching_loss": "flow_matching_loss_solution",
}


def code_cells(path: Path) -> list[str]:
    return ["".join(c["source"]) for c in json.loads(path.read_text())["cells"] if c["cell_type"] == "code"]


def test_every_checker_has_a_solution_and_every_solution_a_checker():
    checkers = {n for n in dir(exercises) if n.startswith("check_")}
    solved = {n for n in dir(solutions) if n.endswith("_solution")}
    assert checkers == set(PAIRS) and solved == set(PAIRS.values())


@pytest.mark.parametrize("check, solution", PAIRS.items())
def test_every_solution_passes_its_checker(check, solution, capsys):
    folded = reveal(getattr(solutions, solution), getattr(exercises, check))
    assert capsys.readouterr().out.startswith("✓")
    assert folded.name == solution and folded.source.startswith(f"def {solution}(")


def test_reveal_folds_the_source_and_escapes_it():
    folded = FoldedSolution("f", "def f(a):\n    return a < 1 and a > -1\n")
    page = folded._repr_html_()
    assert page.startswith("<details>") and page.endswith("</details>") and " open" not in page.split(">")[0]
    assert "a &lt; 1 and a &gt; -1" in page and "a < 1" not in page
    assert "return" not in repr(folded)  # a plain-text view names the answer's place, not the answer


def test_reveal_refuses_a_wrong_solution(capsys):
    with pytest.raises(AssertionError, match="alpha_bar_solution fails check_q_sample"):
        reveal(solutions.alpha_bar_solution, exercises.check_q_sample)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebooks_reveal_solutions_instead_of_printing_them(path):
    cells = code_cells(path)
    assert not any(re.search(r"^def \w+_solution\(", c, re.M) for c in cells), "a solution is written out in the notebook"
    attempted = {m for c in cells for m in re.findall(r"^(check_\w+)\(my_", c, re.M)}
    revealed = {m for c in cells for m in re.findall(r"^reveal\(\w+, (check_\w+)\)", c, re.M)}
    assert attempted == revealed
