"""Named errors and the exit codes of the ``scoredensity`` command.

Library code raises ordinary, specific exceptions (``ValueError`` subclasses for bad input, ``OSError`` for the
file system); the command line turns each into one line on stderr and an exit code from the table below, so that
scripts and schedulers can tell the classes of failure apart. A traceback is shown only with ``--debug`` (or
``SCOREDENSITY_DEBUG=1``).

=====  ===========================================================================================
code   meaning
=====  ===========================================================================================
0      success
1      an unexpected internal error (a bug: please report it with the ``--debug`` traceback)
2      usage or bad input: an option's value, an unknown name, an unusable combination of options
3      data or checkpoint error: a file that is missing, truncated, corrupted, crafted or of the wrong kind
4      I/O error: permission denied, read-only file system, full disk, a path under a file, an existing file
5      divergence: a non-finite loss, weights or estimate (the last good checkpoint is kept)
6      busy: the run folder is locked by another process
130    interrupted by SIGINT (Ctrl-C); 143: terminated by SIGTERM (training saves a checkpoint first)
=====  ===========================================================================================

Other modules either raise one of the classes here, or set an integer ``exit_code`` attribute on their own
exception class; :func:`exit_code_for` honours both.
"""

from __future__ import annotations

import errno
import os
import signal

__all__ = [
    "EXIT_OK",
    "EXIT_INTERNAL",
    "EXIT_USAGE",
    "EXIT_DATA",
    "EXIT_IO",
    "EXIT_DIVERGED",
    "EXIT_BUSY",
    "EXIT_SIGINT",
    "EXIT_SIGTERM",
    "EXIT_CODES",
    "ScoreDensityError",
    "UsageError",
    "InputFileError",
    "DivergenceError",
    "RunBusyError",
    "Interrupted",
    "exit_code_for",
    "one_line",
]

EXIT_OK = 0
EXIT_INTERNAL = 1
EXIT_USAGE = 2
EXIT_DATA = 3
EXIT_IO = 4
EXIT_DIVERGED = 5
EXIT_BUSY = 6
EXIT_SIGINT = 128 + signal.SIGINT  # 130
EXIT_SIGTERM = 128 + signal.SIGTERM  # 143

EXIT_CODES: dict[int, str] = {
    EXIT_OK: "success",
    EXIT_INTERNAL: "unexpected internal error (rerun with --debug for the traceback)",
    EXIT_USAGE: "usage or bad input",
    EXIT_DATA: "data or checkpoint error",
    EXIT_IO: "I/O error (permission, read-only or full file system, path under a file, existing file)",
    EXIT_DIVERGED: "divergence (non-finite loss, weights or estimate)",
    EXIT_BUSY: "run folder locked by another process",
    EXIT_SIGINT: "interrupted (SIGINT)",
    EXIT_SIGTERM: "terminated (SIGTERM)",
}
"""Exit code -> meaning, as documented in ``scoredensity --help``."""


class ScoreDensityError(Exception):
    """Base of the named errors; ``exit_code`` is what the command line exits with."""

    exit_code: int = EXIT_USAGE


class UsageError(ScoreDensityError, ValueError):
    """A bad option value or combination (exit code 2)."""

    exit_code = EXIT_USAGE


class InputFileError(ScoreDensityError, ValueError):
    """A file that cannot be used as input: missing, truncated, corrupted, crafted or of the wrong kind (exit 3).

    The message names the file."""

    exit_code = EXIT_DATA


class DivergenceError(ScoreDensityError, RuntimeError):
    """Training or an estimate produced non-finite values (exit code 5). The trainer raises it after keeping
    the last good checkpoint."""

    exit_code = EXIT_DIVERGED


class RunBusyError(ScoreDensityError, RuntimeError):
    """A run folder is locked by another live process (exit code 6)."""

    exit_code = EXIT_BUSY


class Interrupted(ScoreDensityError):
    """Work stopped by a signal after saving what could be saved (exit code 128 + the signal number).

    Args:
        message: what was kept (e.g. "checkpoint saved at step 1200").
        signum: the signal (default SIGINT).
    """

    def __init__(self, message: str = "interrupted", signum: int = signal.SIGINT) -> None:
        super().__init__(message)
        self.signum = int(signum)
        self.exit_code = 128 + self.signum


_OS_REASONS = {
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
    errno.EROFS: "read-only file system",
    errno.ENOSPC: "no space left on device",
    errno.EDQUOT: "disk quota exceeded",
    errno.ENOTDIR: "a component of the path is a file, not a folder",
    errno.EISDIR: "is a folder, not a file",
    errno.EEXIST: "already exists",
    errno.ENOENT: "no such file or folder",
    errno.ENAMETOOLONG: "file name too long",
    errno.ENOTEMPTY: "folder not empty",
    errno.EMFILE: "too many open files",
    errno.EIO: "input/output error",
}


def _describe_os_error(e: OSError) -> str:
    custom = e.strerror and e.errno is not None and e.strerror != os.strerror(e.errno)
    reason = e.strerror if custom else _OS_REASONS.get(e.errno or -1) or (e.strerror or str(e) or type(e).__name__)
    names = [str(f) for f in (e.filename, e.filename2) if f is not None]
    return f"{' -> '.join(names)}: {reason}" if names else reason


_CODES_BY_NAME = {
    "DivergenceError": EXIT_DIVERGED,
    "TrainingDiverged": EXIT_DIVERGED,  # scoredensity.train
    "TrainingInterrupted": EXIT_SIGTERM,  # scoredensity.train; 128 + its signum
    "RunLockedError": EXIT_BUSY,  # scoredensity.runlock
    "DataError": EXIT_DATA,  # scoredensity.data
    "CheckpointError": EXIT_DATA,  # scoredensity.checkpoint
    "ConfigError": EXIT_DATA,  # scoredensity.config_schema
    "SafetensorError": EXIT_DATA,
    "DecompressionBombError": EXIT_DATA,
    "UnpicklingError": EXIT_DATA,
}


def exit_code_for(e: BaseException) -> int:
    """The exit code for an exception (table in the module docstring)."""
    if isinstance(e, KeyboardInterrupt):
        return EXIT_SIGINT
    code = getattr(e, "exit_code", None)
    if isinstance(code, int) and not isinstance(code, bool):
        return code
    for cls in type(e).__mro__:  # other modules' classes, by name (no import cycle, nothing to register)
        if cls.__name__ in _CODES_BY_NAME:
            if cls.__name__ == "TrainingInterrupted" and isinstance(getattr(e, "signum", None), int):
                return 128 + e.signum
            return _CODES_BY_NAME[cls.__name__]
    if isinstance(e, FileNotFoundError):  # a missing input (outputs get their folders created)
        return EXIT_DATA
    if isinstance(e, OSError):
        return EXIT_IO if e.errno is not None else EXIT_DATA
    if isinstance(e, KeyError):  # a key missing from a file's contents (crafted configs, checkpoints)
        return EXIT_DATA
    if isinstance(e, ValueError | TypeError | IndexError | OverflowError | ZeroDivisionError | RuntimeError):
        return EXIT_USAGE
    return EXIT_INTERNAL


def one_line(e: BaseException) -> str:
    """The exception as one line of text: an ``OSError`` as ``file: reason``; other messages with their newlines
    folded (a message without text falls back to the exception's type)."""
    if isinstance(e, OSError) and e.errno is not None and not isinstance(e, ScoreDensityError):
        text = _describe_os_error(e)
    else:
        text = str(e.args[0]) if isinstance(e, KeyError) and len(e.args) == 1 else str(e)
        if isinstance(e, KeyError):
            text = f"missing key {text!r}" if not text.startswith("missing") else text
    text = " ".join(part.strip() for part in text.splitlines() if part.strip())
    return text or type(e).__name__
