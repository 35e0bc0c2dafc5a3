"""A run directory belongs to one run.

- **Lock.** A run holds ``<run>/.lock`` with ``fcntl.flock`` from start to exit (errors and Ctrl-C
  included; the kernel drops it when the process dies, so a killed run leaves no stale lock). Under
  torchrun only rank 0 takes it. A second run into the same directory stops with one line naming the
  directory and the process that holds it. The file itself stays (deleting a lock file races with a
  process about to lock it); it holds the holder's pid and host.
- **No silent overwrite.** A directory that already holds a run's files (a finished run, a stopped
  run, or kdkit outputs such as ``report.md``) is refused unless the run resumes it (``--resume``)
  or replaces it (``--overwrite``). Replacing removes the previous run's files (:data:`OUTPUTS`
  and ``checkpoints/``) before anything is written; other files and folders stay, and a directory
  that holds no run loses nothing.
- **Clean start.** ``.*.tmp`` files that killed atomic writes left behind (in ``checkpoints/``, and
  those of the run's own files next to it) are removed when a run starts or resumes, under the lock.
"""

from __future__ import annotations

import os
import shutil
import socket
from pathlib import Path

import torch

from ..errors import KdkitError
from .checkpoint import TMP_GLOB, peek_position
from .distributed import DistInfo

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX: runs are not locked
    fcntl = None  # type: ignore[assignment]

LOCK = ".lock"
CHECKPOINTS = ("checkpoints/pending.pt", "checkpoints/last.pt")  # newest first, as --resume reads them
# the files whose presence makes a directory a run's (any of them would be overwritten by a new run)
MARKERS = ("summary.json", "config.yaml", "metrics.jsonl", "report.md", "student.safetensors", "student.json")
# what --overwrite removes at the top level of the directory, besides checkpoints/
OUTPUTS = ("config.yaml", "metrics.jsonl", "report.md", "styles.md", "*.json", "*.png", "*.safetensors")


class RunLock:
    """An exclusive ``flock`` on ``<run_dir>/.lock``; :meth:`acquire` fails at once if another holds it."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK
        self._fd: int | None = None

    def acquire(self) -> RunLock:
        if fcntl is None:
            return self
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = _read(fd)
            os.close(fd)
            raise KdkitError(_in_use(self.run_dir, holder)) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode())
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    @property
    def held(self) -> bool:
        return self._fd is not None


def _read(fd: int) -> str:
    os.lseek(fd, 0, os.SEEK_SET)
    return os.read(fd, 200).decode(errors="replace").strip() or "pid unknown"


def _in_use(run_dir: Path, holder: str) -> str:
    return (
        f"run directory {run_dir} is in use by another kdkit run ({holder}); wait for it to finish, "
        "or choose another --out"
    )


def lock_holder(run_dir: Path) -> str | None:
    """Who holds the lock of ``run_dir`` (``pid N on HOST``), or None when nobody does."""
    path = Path(run_dir) / LOCK
    if fcntl is None or not path.is_file():
        return None
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError:
        return _read(fd)
    else:
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def describe(run_dir: Path) -> tuple[str, bool] | None:
    """What an existing run directory holds, and whether ``--resume`` can continue it; None if
    it holds no run."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return None
    if (run_dir / "summary.json").is_file():
        return "a finished run", False
    newest = [run_dir / c for c in CHECKPOINTS if (run_dir / c).is_file()]
    if newest:
        where = peek_position(newest[0])
        if where is None:
            return "a stopped run whose checkpoint cannot be read", False
        return f"a stopped run (last checkpoint at {where})", True
    if (run_dir / "config.yaml").is_file() or (run_dir / "metrics.jsonl").is_file():
        return "a run stopped before its first checkpoint", False
    found = [name for name in MARKERS if (run_dir / name).is_file()]
    if found:
        return f"kdkit outputs ({', '.join(found)})", False
    return None


def _refusal(run_dir: Path, what: str, resumable: bool) -> str:
    ways = [f"continue it with `kdkit train --resume {run_dir}`"] if resumable else []
    ways += ["replace it with --overwrite (overwrite=True in Python)", "choose another --out"]
    return f"{run_dir} already holds {what}; " + ", ".join(ways[:-1]) + f" or {ways[-1]}"


def _check_path(run_dir: Path) -> None:
    if run_dir.exists() and not run_dir.is_dir():
        raise KdkitError(f"run directory {run_dir} is an existing file, not a folder; choose another --out")


def check_run_dir(
    run_dir: Path, resume: bool = False, overwrite: bool = False, probe_lock: bool = True
) -> None:
    """Refuse early, before anything is built: a file, a directory in use (``probe_lock``: leave it
    to rank 0 under torchrun), or (unless ``resume`` or ``overwrite``) a directory holding a run.
    Reads only; :func:`claim_run_dir` decides for real."""
    run_dir = Path(run_dir)
    if resume and overwrite:
        raise KdkitError("give --resume (continue the run) or --overwrite (replace it), not both")
    _check_path(run_dir)
    holder = lock_holder(run_dir) if probe_lock else None
    if holder is not None:
        raise KdkitError(_in_use(run_dir, holder))
    if not resume and not overwrite:
        found = describe(run_dir)
        if found is not None:
            raise KdkitError(_refusal(run_dir, *found))


def clear_outputs(run_dir: Path) -> list[Path]:
    """Remove the files a previous run wrote (:data:`OUTPUTS`, ``checkpoints/``); returns them."""
    removed = []
    for pattern in OUTPUTS:
        for path in run_dir.glob(pattern):
            if path.is_file() or path.is_symlink():
                path.unlink()
                removed.append(path)
    checkpoints = run_dir / "checkpoints"
    if checkpoints.is_dir():
        removed.append(checkpoints)
        shutil.rmtree(checkpoints)
    return removed


def remove_stale_tmp(run_dir: Path) -> list[Path]:
    """Delete the ``.*.tmp`` files of interrupted atomic writes; call only while holding the lock."""
    stale = list((run_dir / "checkpoints").glob(TMP_GLOB))
    stale += [p for name in (*MARKERS, "styles.md", "styles.json") for p in run_dir.glob(f".{name}.*.tmp")]
    for path in stale:
        path.unlink(missing_ok=True)
    return stale


def claim_run_dir(run_dir: Path, resume: bool = False, overwrite: bool = False) -> RunLock:
    """Create ``run_dir``, lock it, apply the overwrite policy and remove stale temporary files.

    Returns the held lock: release it when the run ends (``finally``). Raises KdkitError with one
    line when the directory is a file, is in use, or holds a run and neither ``resume`` nor
    ``overwrite`` is set.
    """
    run_dir = Path(run_dir)
    if resume and overwrite:
        raise KdkitError("give --resume (continue the run) or --overwrite (replace it), not both")
    _check_path(run_dir)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise KdkitError(
            f"cannot create run directory {run_dir} ({exc.strerror}); choose another --out"
        ) from None
    lock = RunLock(run_dir).acquire()
    try:
        if not resume:
            found = describe(run_dir)
            if found is not None and not overwrite:
                raise KdkitError(_refusal(run_dir, *found))
            if found is not None:
                clear_outputs(run_dir)
        remove_stale_tmp(run_dir)
    except BaseException:
        lock.release()
        raise
    return lock


def claim_for_run(run_dir: Path, info: DistInfo, resume: bool, overwrite: bool) -> RunLock | None:
    """Rank 0 claims the run directory (:func:`claim_run_dir`); every process raises the same one-line
    error if it cannot. Returns rank 0's lock (``None`` elsewhere)."""
    lock, message = None, ""
    if info.main:
        try:
            lock = claim_run_dir(run_dir, resume=resume, overwrite=overwrite)
        except KdkitError as exc:
            message = str(exc)
    if info.active:
        box = [message]
        torch.distributed.broadcast_object_list(box, src=0)
        message = box[0]
    if message:
        raise KdkitError(message)
    return lock
