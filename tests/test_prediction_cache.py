"""The prediction cache is input, not truth: every damaged, foreign or forged file is recomputed, never trusted or hung on."""

import os
import signal

import pytest
import torch

from ddpm_lib.checkpoint import save_checkpoint
from ddpm_lib.prediction_cache import SPOT_CHECKS, cached, digest, max_bytes

N = 64  # rows in the cached set: more than SPOT_CHECKS, so that a read recomputes only those


def compute(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A stand-in judge: deterministic features (n, 128) and probabilities (n, 10) of each image alone."""
    flat = images.flatten(1)[:, :128]  # (n, 128)
    return flat.abs(), torch.softmax(flat[:, :10], dim=1)


@pytest.fixture
def images() -> torch.Tensor:
    return torch.rand(N, 1, 28, 28, generator=torch.Generator().manual_seed(0)) * 2 - 1


@pytest.fixture(autouse=True)
def no_hang():
    """A read that blocks (the probe's FIFO waited 240 s) fails the test instead of stalling the run."""
    signal.signal(signal.SIGALRM, lambda *_: pytest.fail("the cache read hung"))
    signal.alarm(30)
    yield
    signal.alarm(0)


def counting(calls: list[int]):
    def judge(images):
        calls.append(len(images))
        return compute(images)

    return judge


def test_a_good_cache_is_read_back_with_a_spot_check_only(images, tmp_path, capsys):
    path = tmp_path / "p.pt"
    expected = compute(images)
    first = cached(path, images, compute)
    assert all(torch.equal(a, b) for a, b in zip(first, expected, strict=True)) and path.stat().st_size <= max_bytes(N)
    calls: list[int] = []
    again = cached(path, images, counting(calls))
    assert all(torch.equal(a, b) for a, b in zip(again, expected, strict=True))
    assert calls == [SPOT_CHECKS] and capsys.readouterr().err == ""


def bad_files(images, deflated_bomb):
    """The probe's hostile cache files, each built here: (what, what the warning says, how to make it)."""
    features, probs = compute(images)

    def state(**changes):
        good = {"features": features, "probs": probs, "count": N, "sha256": digest([features, probs])}
        return {**good, **changes}

    shifted = features + 1.0  # every row moved, its digest recomputed: only the spot check can tell
    return [
        ("empty", "empty (0 bytes)", lambda p: p.write_bytes(b"")),
        ("a FIFO", "a named pipe (FIFO), not a file", lambda p: os.mkfifo(p)),
        ("a link to /etc/passwd", "a text file", lambda p: p.symlink_to("/etc/passwd")),
        ("a bomb", "declares 128 MiB of data", lambda p: deflated_bomb(p, 2**27)),  # 0.6 MB on disk: under the size limit
        ("a list", "not a ddpm_lib checkpoint", lambda p: torch.save([features, probs], p)),
        ("strings", "its features are a str, not (64, 128) float32", lambda p: save_checkpoint(p, state(features="x", probs="y"))),
        ("NaN features", "its features hold NaN or inf", lambda p: save_checkpoint(p, state(features=features * float("nan")))),
        (
            "10 rows",
            "its features are (10, 128) torch.float32, not (64, 128) float32",
            lambda p: save_checkpoint(p, state(features=features[:10])),
        ),
        ("float64", "not (64, 128) float32", lambda p: save_checkpoint(p, state(features=features.double()))),
        (
            "a changed value",
            "do not match the digest",
            lambda p: save_checkpoint(p, {**state(), "features": features + (features == features.max()) * 1e-3}),
        ),
        (
            "shifted, digest and all",
            "rows computed again differ",
            lambda p: save_checkpoint(p, state(features=shifted, sha256=digest([shifted, probs]))),
        ),
        ("too large", "more than 64 rows take", lambda p: p.write_bytes(b"PK\x03\x04" + b"\0" * max_bytes(N))),
    ]


@pytest.mark.parametrize("case", range(12))
def test_a_bad_cache_file_is_recomputed_with_one_line_and_replaced(images, tmp_path, capsys, deflated_bomb, case):
    what, says, make = bad_files(images, deflated_bomb)[case]
    path = tmp_path / "p.pt"
    make(path)
    got = cached(path, images, compute)
    assert all(torch.equal(a, b) for a, b in zip(got, compute(images), strict=True)), what  # never a number from the file
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"ddpm_lib: ignored the cached predictions {path} (") and says in err, (what, err)
    assert path.is_file() and not path.is_symlink()  # replaced by a good file (a link itself, never what it points to)
    calls: list[int] = []
    cached(path, images, counting(calls))
    assert calls == [SPOT_CHECKS] and capsys.readouterr().err == "", what  # the replacement is read back
    assert open("/etc/passwd").read().startswith("root:")  # the link's target untouched
