import errno
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from ddpm_lib.files import (
    OutputPathError,
    PathInUseError,
    atomic_write,
    check_writable,
    exclusive_lock,
    helper_stem,
    lock_path,
    write_atomic,
    write_section,
)


def test_atomic_write_replaces_the_file_only_on_success(tmp_path):
    path = tmp_path / "out.bin"
    path.write_bytes(b"old")
    with pytest.raises(RuntimeError):
        with atomic_write(path) as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("crash mid-write")
    assert path.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.bin"]  # no temporary left behind
    with atomic_write(path) as tmp:
        tmp.write_bytes(b"new")
    assert path.read_bytes() == b"new" and len(list(tmp_path.iterdir())) == 1
    assert path.stat().st_mode & 0o044  # readable by others, like any file the user writes


def test_unwritable_paths_are_refused_before_any_work(tmp_path):
    with pytest.raises(OutputPathError, match="does not exist"):
        check_writable(tmp_path / "missing" / "x.png")
    with pytest.raises(OutputPathError, match="is a folder"):
        check_writable(tmp_path)


def test_the_writability_probe_writes_for_real_and_leaves_nothing(tmp_path):
    check_writable(tmp_path / "x.png")
    assert list(tmp_path.iterdir()) == []
    if Path("/proc/self").is_dir():  # root's os.access says yes to /proc; creating a file there fails
        assert os.access("/proc", os.W_OK) or os.geteuid() != 0
        with pytest.raises(OutputPathError, match="cannot write /proc/x.png"):
            check_writable("/proc/x.png")


@pytest.mark.parametrize("call", ["fsync", "replace"])
def test_a_failed_write_is_one_clear_error_and_keeps_the_old_file(tmp_path, monkeypatch, call):
    path = tmp_path / "out.bin"
    path.write_bytes(b"old")

    def full(*args):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, call, full)
    with pytest.raises(OutputPathError, match="cannot write .*out.bin: no space left on device"):
        write_atomic(path, b"new")
    monkeypatch.undo()
    assert path.read_bytes() == b"old" and sorted(p.name for p in tmp_path.iterdir()) == ["out.bin"]


@pytest.fixture
def tiny_disk(tmp_path):
    """A 64 KiB file system, where the machine lets us mount one (root on Linux)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here")
    yield mount
    subprocess.run(["umount", str(mount)], check=True)


def test_a_really_full_disk_keeps_the_old_file(tiny_disk):
    path = tiny_disk / "out.bin"
    path.write_bytes(b"old")
    check_writable(path)  # an empty file still fits: the disk fills only while writing
    with pytest.raises(OutputPathError, match="no space left on device"):
        write_atomic(path, bytes(200_000))
    assert path.read_bytes() == b"old" and [p.name for p in tiny_disk.iterdir()] == ["out.bin"]


def dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_stale_temporaries_of_dead_writers_are_removed_by_the_next_write(tmp_path):
    path = tmp_path / "run.pt"
    stale = tmp_path / f".run.pt.ddpm-{dead_pid()}-abcd_123.tmp"
    live = tmp_path / f".run.pt.ddpm-{os.getppid()}-abcd_123.tmp"  # a concurrent writer that is still running
    foreign = [
        tmp_path / ".run.pt.other.tmp",
        tmp_path / f".run.pt.ddpm-{dead_pid()}-x.tmp",
        tmp_path / f".log.ddpm-{dead_pid()}-abcd_123.tmp",
    ]
    for p in (stale, live, *foreign):
        p.write_bytes(b"partial")
    write_atomic(path, b"new")
    assert path.read_bytes() == b"new" and not stale.exists()
    assert live.exists() and all(p.exists() for p in foreign)  # not ours, or not dead: left alone


def test_an_exclusive_lock_refuses_a_second_holder_and_is_released(tmp_path):
    path = tmp_path / "run.pt"
    with exclusive_lock(path):
        with pytest.raises(PathInUseError, match=f"{path} is in use by another run"):
            with exclusive_lock(path):
                pass
    with exclusive_lock(path):  # free again
        pass
    assert lock_path(path) == tmp_path / ".run.pt.lock"


def test_a_tidy_lock_removes_only_the_lock_file_it_made_and_never_makes_a_folder(tmp_path):
    path = tmp_path / "model.pt"
    with exclusive_lock(path, tidy=True):
        assert lock_path(path).exists()
        with pytest.raises(PathInUseError):  # held as any lock is
            with exclusive_lock(path):
                pass
    assert not lock_path(path).exists()  # made by this export, gone with it
    lock_path(path).write_bytes(b"")  # a training run's, which stays
    with exclusive_lock(path, tidy=True):
        pass
    assert lock_path(path).exists()
    with pytest.raises(OutputPathError, match="folder .*missing does not exist"):
        with exclusive_lock(tmp_path / "missing" / "model.pt"):
            pass
    assert not (tmp_path / "missing").exists()


def test_helper_files_of_a_long_name_stay_legal_and_are_still_recognised(tmp_path):
    path = tmp_path / ("n" * 250)  # legal; ".<name>.lock" and ".<name>.ddpm-PID-XXXXXXXX.tmp" would not be
    stem = helper_stem(path)
    assert stem != path.name and stem.startswith("n" * 40 + "~") and len(stem) == 57 and helper_stem(tmp_path / "run.pt") == "run.pt"
    assert len(lock_path(path).name) <= 255 and helper_stem(tmp_path / ("n" * 249 + "m")) != stem  # the digest tells names apart
    stale = tmp_path / f".{stem}.ddpm-{dead_pid()}-abcd_123.tmp"
    stale.write_bytes(b"partial")
    with exclusive_lock(path):
        write_atomic(path, b"new")
    assert path.read_bytes() == b"new" and not stale.exists()  # a killed writer's temporary of the long name is found
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([path.name, lock_path(path).name])


def test_a_lock_of_a_killed_process_does_not_block(tmp_path):
    path = tmp_path / "run.pt"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            f"from ddpm_lib.files import exclusive_lock\nwith exclusive_lock({str(path)!r}):\n    print('locked', flush=True)\n    input()",
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert holder.stdout.readline() == "locked\n"
    with pytest.raises(PathInUseError):
        with exclusive_lock(path):
            pass
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    with exclusive_lock(path):  # the OS released it with the process
        pass


def test_write_section_replaces_its_own_section_and_keeps_the_rest(tmp_path):
    path = tmp_path / "benchmarks.md"
    path.write_text("# Benchmarks\n\nthe CPU rows\n")
    write_section(path, "gpu-check", "## GPU\nfirst")
    write_section(path, "solvers", "## Solvers\none")
    write_section(path, "gpu-check", "## GPU\nsecond\n")
    text = path.read_text()
    assert text.startswith("# Benchmarks\n\nthe CPU rows\n\n<!-- gpu-check: begin -->\n## GPU\nsecond\n<!-- gpu-check: end -->")
    assert text.count("## GPU") == 1 and "first" not in text and "## Solvers\none\n<!-- solvers: end -->" in text
    write_section(tmp_path / "new.md", "solvers", "x")
    assert (tmp_path / "new.md").read_text() == "<!-- solvers: begin -->\nx\n<!-- solvers: end -->\n"
