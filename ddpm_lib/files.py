"""Writing files so that nothing a user made is lost: early checks, atomic writes, one writer per file.

* :func:`check_writable` proves, before any long work, that a path can be written, by creating
  and removing a real temporary file beside it (``os.access`` says yes to root even where writing
  fails, as in /proc).
* :func:`atomic_write` writes to a temporary file beside the target and renames it over the
  target in one step, so the target is always either the old file or the complete new one.
  Temporary files are named ``.<name>.ddpm-<pid>-<random>.tmp``; one left behind by a process
  that was killed is removed by the next write to the same target.
* :func:`exclusive_lock` holds an OS lock on ``.<name>.lock`` beside a path, so two training
  runs cannot write one checkpoint; the OS releases it when its process dies, however it dies.
* Any name the file system takes works: where ``<name>`` would make those helper names too long,
  they use a shortened name with a digest of the whole one instead (:func:`helper_stem`).

Every failure is an :class:`OutputPathError` (an ``OSError``) whose message names the path.
"""

from __future__ import annotations

import glob
import hashlib
import os
import re
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import filelock


class OutputPathError(OSError):
    """An output path cannot be written."""


class PathInUseError(OutputPathError):
    """Another process holds the lock on an output path."""


HELPER_SUFFIX = len(".ddpm-4294967295-abcdefgh.tmp")  # the longest a temporary or lock name adds to ".<name>"


def name_limit(folder: Path) -> int:
    """The longest file name, in bytes, that the file system of ``folder`` takes (255 almost everywhere)."""
    try:
        return os.pathconf(folder if folder.is_dir() else ".", "PC_NAME_MAX")
    except (OSError, ValueError):
        return 255


def helper_stem(path: Path) -> str:
    """The ``<name>`` of the temporary and lock files beside ``path``: its name, or, where the file system's
    limit on a name would then be passed, its first 40 characters and 16 hex digits of its SHA-256."""
    name = path.name
    if len(os.fsencode(name)) + 1 + HELPER_SUFFIX <= name_limit(path.parent):
        return name
    return f"{name[:40]}~{hashlib.sha256(os.fsencode(name)).hexdigest()[:16]}"


def _temp_prefix(path: Path) -> str:
    return f".{helper_stem(path)}.ddpm-{os.getpid()}-"


def _new_temp(path: Path) -> Path:
    """A new, empty temporary file beside ``path``, with the usual permissions (mkstemp makes it private)."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=_temp_prefix(path), suffix=".tmp")
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    return Path(tmp)


def _reason(e: OSError) -> str:
    return (e.strerror or str(e) or type(e).__name__).lower()


def check_writable(path: str | os.PathLike) -> Path:
    """Fail early, before any work, if ``path`` cannot be created or replaced."""
    path = Path(path)
    parent = path.parent
    if not parent.is_dir():
        raise OutputPathError(f"cannot write {path}: folder {parent} does not exist")
    size, limit = len(os.fsencode(path.name)), name_limit(parent)
    if size > limit:
        raise OutputPathError(f"cannot write {path}: its name has {size} bytes, more than the {limit} a file name may have here")
    if path.is_dir():
        raise OutputPathError(f"cannot write {path}: it is a folder")
    if path.exists() and not os.access(path, os.W_OK):
        raise OutputPathError(f"cannot write {path}: the file is read-only")
    try:
        _new_temp(path).unlink()
    except OSError as e:
        raise OutputPathError(f"cannot write {path}: {_reason(e)}") from e
    return path


def same_file(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """Whether ``a`` and ``b`` name one file: the same path, a symbolic or a hard link (False if either is missing)."""
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, and belongs to another user
        return True
    return True


def remove_stale_temps(path: str | os.PathLike) -> list[Path]:
    """Remove the temporary files of :func:`atomic_write` for ``path`` whose process is no longer running.

    Only files of exactly this module's naming pattern are touched (never another program's);
    those of live processes, such as a concurrent write, stay. Returns the removed paths.
    """
    path = Path(path)
    if os.name != "posix":  # os.kill(pid, 0) would not be a harmless question elsewhere
        return []
    stem = helper_stem(path)
    pattern = re.compile(rf"\.{re.escape(stem)}\.ddpm-(\d+)-[a-z0-9_]{{8}}\.tmp")
    removed = []
    for candidate in path.parent.glob(f".{glob.escape(stem)}.ddpm-*.tmp"):
        match = pattern.fullmatch(candidate.name)
        if match and int(match[1]) != os.getpid() and not _process_alive(int(match[1])):
            candidate.unlink(missing_ok=True)
            removed.append(candidate)
    return removed


@contextmanager
def atomic_write(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it is renamed to ``path`` in one step.

    If the body raises, the temporary file is removed and ``path`` is left as it was. An
    ``OSError`` (a full disk, a folder that vanished) becomes an :class:`OutputPathError`.
    """
    path = check_writable(path)
    remove_stale_temps(path)
    try:
        tmp = _new_temp(path)
    except OSError as e:
        raise OutputPathError(f"cannot write {path}: {_reason(e)}") from e
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OutputPathError:
        raise
    except OSError as e:
        raise OutputPathError(f"cannot write {path}: {_reason(e)}; the file there (if any) is unchanged") from e
    finally:
        tmp.unlink(missing_ok=True)


def write_atomic(path: str | os.PathLike, data: bytes | memoryview) -> Path:
    """Write ``data`` to ``path`` with :func:`atomic_write`; every failure is a one-line OutputPathError.

    Encode a file in memory first (``torch.save`` to a BytesIO, imageio to bytes), then write it
    here: the libraries' own writers report a full disk as cryptic RuntimeErrors or as warnings
    from a destructor, Python's ``write`` as the OSError it is.
    """
    with atomic_write(path) as tmp, open(tmp, "wb") as f:
        f.write(data)
    return Path(path)


def lock_path(path: str | os.PathLike) -> Path:
    """The lock file of ``path``: runs/mnist.pt -> runs/.mnist.pt.lock."""
    path = Path(path)
    return path.with_name(f".{helper_stem(path)}.lock")


@contextmanager
def exclusive_lock(path: str | os.PathLike, tidy: bool = False) -> Iterator[None]:
    """Hold an exclusive OS file lock on :func:`lock_path` of ``path`` for the body, or fail at once.

    A second holder, in this process or another, gets a :class:`PathInUseError` immediately. The
    OS drops the lock when its process ends, so a killed run never blocks the next one. The small
    lock file stays, unless ``tidy`` and this call created it: it is then removed while still held
    (short jobs such as an export; nobody waits on a lock, so a process that opens it meanwhile is
    refused as it would be anyway). ``path``'s folder must exist: the lock never creates one.
    """
    lock_file = lock_path(path)
    if not lock_file.parent.is_dir():
        raise OutputPathError(f"cannot lock {path}: folder {lock_file.parent} does not exist")
    created = tidy and not lock_file.exists()
    lock = filelock.FileLock(lock_file, timeout=0)
    try:
        lock.acquire()
    except filelock.Timeout:
        raise PathInUseError(f"{path} is in use by another run (it holds the lock {lock_path(path)}); wait for it to end") from None
    except OSError as e:
        raise OutputPathError(f"cannot lock {path}: {_reason(e)}") from e
    try:
        yield
    finally:
        if created:
            lock_file.unlink(missing_ok=True)
        lock.release()


def write_section(path: str | os.PathLike, name: str, body: str) -> Path:
    """Replace the section ``name`` of the Markdown file ``path`` with ``body``, atomically, keeping the rest.

    A section lies between ``<!-- name: begin -->`` and ``<!-- name: end -->``; one that is not there yet
    is appended. ``scripts/benchmark.py`` and ``scripts/gpu_check.py`` each keep their own section of
    docs/benchmarks.md this way, so neither run erases the other's measurements.
    """
    path = Path(path)
    begin, end = f"<!-- {name}: begin -->", f"<!-- {name}: end -->"
    section = f"{begin}\n{body.strip(chr(10))}\n{end}"
    text = path.read_text() if path.exists() else ""
    if begin in text and end in text:
        text = text[: text.index(begin)] + section + text[text.index(end) + len(end) :]
    else:
        text = (text.rstrip("\n") + "\n\n" if text.strip() else "") + section + "\n"
    return write_atomic(path, text.encode())
