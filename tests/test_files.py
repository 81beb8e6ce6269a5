import pytest

from ddpm_lib.files import OutputPathError, atomic_write, check_writable


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
