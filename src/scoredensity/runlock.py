"""Run folders: the one-writer lock, what counts as "a run of ours", and clean-up of debris left by a kill.

The lock is an OS file lock (``flock`` through :mod:`filelock`) on ``<run>/.train.lock``, held for the whole of a
training or resuming call. The kernel releases it when the process dies, however it dies (SIGKILL included), so
a stale lock never blocks: the lock *file* may remain, but nobody holds it. Readers (``evaluate``, ``sample``,
``export``) take no lock: a checkpoint is replaced by one atomic rename and read in one ``read``, so they see the
old checkpoint or the new one, never half of either.
"""

from __future__ import annotations

import os
from pathlib import Path

from filelock import FileLock, Timeout

from .checkpoint import CHECKPOINT_NAME, CONFIG_NAME, CheckpointError, RunFolderIOError
from .errors import EXIT_BUSY, RunBusyError

__all__ = ["LOCK_NAME", "RunLockedError", "RunLock", "RUN_FILES", "foreign_entries", "remove_orphans", "umask"]

LOCK_NAME = ".train.lock"
METRICS_NAME = "metrics.jsonl"
RUN_FILES = frozenset({CONFIG_NAME, CHECKPOINT_NAME, METRICS_NAME, "tensorboard", LOCK_NAME})
"""Entries a training run writes into its folder (besides temporary files, see :func:`is_temporary`)."""


class RunLockedError(CheckpointError, RunBusyError):
    """Another process is training or resuming this run folder (exit code 6; also a
    :class:`~scoredensity.errors.RunBusyError`)."""

    exit_code = EXIT_BUSY


def umask() -> int:
    """The process's file-creation mask (read without changing it for longer than one call)."""
    m = os.umask(0o022)
    os.umask(m)
    return m


def is_temporary(name: str) -> bool:
    """A temporary file of an atomic write (``.checkpoint.safetensors.XXXX.tmp``, ``.config.json.XXXX.tmp``,
    ``.metrics.jsonl.XXXX.tmp``)."""
    return name.startswith(".") and name.endswith(".tmp") and any(name.startswith(f".{f}.") for f in RUN_FILES)


def foreign_entries(run_dir: str | os.PathLike, allowed: frozenset[str] | set[str] = RUN_FILES) -> list[str]:
    """Names in ``run_dir`` other than ``allowed`` and temporary files of atomic writes (empty when the folder
    does not exist)."""
    p = Path(run_dir)
    if not p.is_dir():
        return []
    return sorted(e.name for e in p.iterdir() if e.name not in allowed and not is_temporary(e.name))


def remove_orphans(run_dir: str | os.PathLike) -> list[str]:
    """Delete temporary files of atomic writes that a killed process left behind; returns their names.

    Call it only while holding the run's lock (a live writer's temporary file must not be removed)."""
    p = Path(run_dir)
    removed = []
    for e in sorted(p.iterdir()) if p.is_dir() else []:
        if is_temporary(e.name) and e.is_file():
            e.unlink(missing_ok=True)
            removed.append(e.name)
    return removed


class RunLock:
    """Exclusive lock of a run folder for one training or resuming process (a context manager).

    Args:
        run_dir: the run folder (created, with its parents, if missing).

    Raises:
        RunLockedError: on entry, when another live process holds the lock (never waits).
    """

    def __init__(self, run_dir: str | os.PathLike):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_NAME
        self._lock: FileLock | None = None

    def __enter__(self) -> RunLock:
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise RunFolderIOError(f"cannot create the run folder {str(self.run_dir)!r}: {e.strerror or e}") from None
        lock = FileLock(str(self.path), timeout=0)  # created honouring the umask
        try:
            lock.acquire()
        except Timeout:
            raise RunLockedError(
                f"run folder {str(self.run_dir)!r} is in use by another training process (it holds {self.path}); "
                "wait until it finishes, or choose another --out"
            ) from None
        except OSError as e:  # after Timeout, which is an OSError too
            raise RunFolderIOError(f"cannot lock the run folder {str(self.run_dir)!r}: {e.strerror or e}") from None
        self._lock = lock
        return self

    def __exit__(self, *exc) -> None:
        if self._lock is not None:
            self._lock.release()
            self._lock = None
