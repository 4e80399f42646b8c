"""Claiming a run directory: one run per directory, a new run never overwrites an old one.

:func:`claim_run_directory` takes the directory's lock file ``.lock`` (an exclusive ``flock``, held until
:meth:`RunClaim.release`; the kernel drops it when the holder dies, so a dead run never blocks the next one, and the
file records the holder's pid, host and start time for the message a second run gets). Under the lock, a new run
(neither ``resume`` nor ``overwrite``) refuses a directory holding anything but the lock file and what a run that
never reached its first checkpoint leaves (``disposable``: its recorded config, its log), which it reuses;
``overwrite`` first renames the old directory to a timestamped sibling (``run`` -> ``run.20261130-101500``), never
deleting it. Temp files an interrupted atomic write left behind are removed first (they are no part of a run).

Claims are reentrant within a thread: a second claim of a directory the same thread holds (the CLI claims before
writing ``config.yaml``, then the trainer's ``fit`` claims again) succeeds without checking, and the lock is
released when the outermost claim is; a claim from another thread of the process is refused like one from another
process.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import threading
import time
from collections.abc import Collection
from pathlib import Path

from metapeft.atomic_files import NAME_MAX, fit_file_name, remove_stale_temporaries

LOCK_NAME = ".lock"
_HELD: dict[Path, RunClaim] = {}


class RunDirectoryError(OSError):
    """A run directory that cannot be claimed: busy (another live run holds its lock) or holding an old run."""


class RunClaim:
    """A held claim on ``directory`` (:func:`claim_run_directory`); ``moved_to`` is where ``overwrite`` moved the
    previous run (None when nothing was moved). Usable as a context manager that releases on exit."""

    def __init__(self, directory: Path, handle: int, moved_to: Path | None, created: bool) -> None:
        self.directory, self.moved_to, self.created = directory, moved_to, created
        self._handle, self._depth, self._thread = handle, 1, threading.get_ident()

    def release(self) -> None:
        """Drop this claim; the outermost release deletes the lock file, unlocks, and removes the directory if the
        claim created it and nothing was written there (a run that failed before it began leaves no trace)."""
        self._depth -= 1
        if self._depth > 0 or self._handle < 0:
            return
        _HELD.pop(self.directory, None)
        (self.directory / LOCK_NAME).unlink(missing_ok=True)
        os.close(self._handle)  # closing drops the flock
        self._handle = -1
        if self.created and not any(self.directory.iterdir()):
            self.directory.rmdir()

    def __enter__(self) -> RunClaim:
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def _holder(lock: Path) -> str:
    try:
        record = json.loads(lock.read_text(encoding="utf-8"))
        return f"pid {record['pid']} on {record['host']}, started {record['started']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "a process that has not yet recorded itself"


def _lock(directory: Path) -> int:
    """An fd holding an exclusive flock on ``directory/.lock`` (created if needed), with this process recorded."""
    lock = directory / LOCK_NAME
    while True:
        handle = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(handle)
            raise RunDirectoryError(f"run directory {directory} is in use by another run ({_holder(lock)}); wait for "
                                    "it to finish or choose another output directory") from None
        try:
            same_file = os.fstat(handle).st_ino == lock.stat().st_ino
        except FileNotFoundError:
            same_file = False
        if same_file:  # else the holder deleted the file between our open and flock: lock the new one
            break
        os.close(handle)
    record = {"pid": os.getpid(), "host": socket.gethostname(),
              "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    os.ftruncate(handle, 0)
    os.write(handle, json.dumps(record).encode())
    os.fsync(handle)
    return handle


def _aside(directory: Path) -> Path:
    """A free sibling name ``<name>.<UTC timestamp>[-n]`` for an old run (``name`` shortened when the whole would
    exceed the file system's name limit)."""
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    n = 0
    while True:
        suffix = f".{stamp}" + (f"-{n}" if n else "")
        candidate = directory.with_name(fit_file_name(directory.name, NAME_MAX - len(suffix)) + suffix)
        if not candidate.exists():
            return candidate
        n += 1


def run_files(directory: str | os.PathLike) -> list[str]:
    """Names in ``directory`` other than its lock file (empty when the directory does not exist)."""
    directory = Path(directory)
    return sorted(p.name for p in directory.iterdir() if p.name != LOCK_NAME) if directory.is_dir() else []


def claim_run_directory(directory: str | os.PathLike, resume: bool = False, overwrite: bool = False,
                        disposable: Collection[str] = ()) -> RunClaim:
    """Lock ``directory`` (created if missing) for one run and make sure it is the right place for it (module
    docstring). ``resume``: continue the run there; ``overwrite``: move an old run aside first (not both).
    ``disposable``: file names a new run may find and replace, when nothing else is there (what a run that failed
    before its first checkpoint leaves behind).

    Raises :class:`RunDirectoryError` when another live process holds the lock (naming its pid and host) or when a
    new run meets a non-empty directory (listing what is there and the two ways on).
    """
    if resume and overwrite:
        raise ValueError("resume and overwrite exclude each other: resume continues the run in the directory, "
                         "overwrite moves it aside and starts a new one")
    directory = Path(directory).resolve()
    held = _HELD.get(directory)
    if held is not None:
        if held._thread != threading.get_ident():
            raise RunDirectoryError(f"run directory {directory} is in use by another run in this process (thread "
                                    f"{held._thread}); choose another output directory")
        held._depth += 1
        return held
    created = not directory.exists()
    directory.mkdir(parents=True, exist_ok=True)
    handle = _lock(directory)
    moved_to = None
    try:
        remove_stale_temporaries(directory)
        existing = run_files(directory)
        if existing and overwrite:
            moved_to = _aside(directory)
            directory.rename(moved_to)
            directory.mkdir()
            created = True
            old_handle, handle = handle, _lock(directory)
            (moved_to / LOCK_NAME).unlink(missing_ok=True)
            os.close(old_handle)
        elif existing and not resume and not set(existing) <= set(disposable):
            shown = ", ".join(existing[:6]) + (", ..." if len(existing) > 6 else "")
            raise RunDirectoryError(f"run directory {directory} is not empty ({shown}); pass resume=True "
                                    "(--resume) to continue the run there, or overwrite=True (--overwrite) to move it "
                                    "aside to a timestamped sibling and start a new run")
    except BaseException:
        RunClaim(directory, handle, moved_to, created).release()
        raise
    claim = RunClaim(directory, handle, moved_to, created)
    _HELD[directory] = claim
    return claim
