"""Command-line entry point ``scoredensity``: a thin layer over the Python API.

Each sub-command lives in its own module under :mod:`scoredensity.commands` and defines
``NAME``, ``HELP``, ``add_arguments(parser)`` and ``run(args) -> int``.

Every failure is reported as one line on stderr, ``scoredensity COMMAND: error: ...`` naming the file or option
at fault, with the exit codes of :mod:`scoredensity.errors` (2 bad input, 3 data or checkpoint, 4 I/O,
5 divergence, 6 busy run folder, 130/143 interrupted). ``--debug`` (or ``SCOREDENSITY_DEBUG=1``) adds the
traceback.
"""

from __future__ import annotations

import argparse
import importlib
import os
import pkgutil
import sys
import traceback

from . import commands as _commands
from .errors import EXIT_CODES, EXIT_SIGINT, EXIT_USAGE, UsageError, exit_code_for, one_line

__all__ = ["main", "build_parser", "CLIError"]


class CLIError(UsageError):
    """An error to report to the user as one line, with a non-zero exit code (kept for old imports)."""


class _Parser(argparse.ArgumentParser):
    """An argument parser whose usage errors are one line (and exit code 2), naming the option."""

    def error(self, message: str) -> None:  # type: ignore[override]
        msg = " ".join(message.split())
        self.exit(EXIT_USAGE, f"{self.prog}: error: {msg} (see '{self.prog} --help')\n")


_EPILOG = "exit codes: " + "; ".join(f"{k} {v}" for k, v in EXIT_CODES.items() if k) + "."

_THREADS_NOTE = (
    "threads: commands that take --threads use OMP_NUM_THREADS when it is set, else 1 thread for small (MLP, 2-D) "
    "models and min(4, cores) for U-Nets; more threads only slow small models down, and oversubscribing a busy "
    "machine is catastrophic."
)


def _command_modules() -> list:
    mods = []
    for info in sorted(pkgutil.iter_modules(_commands.__path__), key=lambda m: m.name):
        if info.name.startswith("_"):
            continue
        mod = importlib.import_module(f"{_commands.__name__}.{info.name}")
        if hasattr(mod, "NAME") and hasattr(mod, "run"):
            mods.append(mod)
    return mods


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every sub-command registered (each also accepts ``--debug``)."""
    parser = _Parser(
        prog="scoredensity",
        description="Log-densities of diffusion models by the score-based density formula.",
        epilog=f"{_EPILOG} {_THREADS_NOTE}",
    )
    parser.add_argument("--debug", action="store_true", help="show the Python traceback of an error")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True
    for mod in _command_modules():
        p = sub.add_parser(mod.NAME, help=mod.HELP, description=mod.HELP, epilog=_EPILOG)
        mod.add_arguments(p)
        p.add_argument(
            "--debug", action="store_true", default=argparse.SUPPRESS, help="show the Python traceback of an error"
        )
        p.set_defaults(_run=mod.run)
    return parser


def _report(command: str, e: BaseException, debug: bool) -> int:
    code = exit_code_for(e)
    if debug:
        traceback.print_exception(type(e), e, e.__traceback__, file=sys.stderr)
    text = one_line(e)
    if type(e).__name__ == "OutOfMemoryError":
        text = f"out of memory ({text[:200]}); lower --max-batch"
    hint = "" if debug or code != 1 else f" ({type(e).__name__}; an internal error: rerun with --debug and report it)"
    print(f"scoredensity {command}: error: {text}{hint}", file=sys.stderr, flush=True)
    return code


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; returns the process exit code (0 on success; :mod:`scoredensity.errors` lists the others)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    debug = bool(getattr(args, "debug", False)) or os.environ.get("SCOREDENSITY_DEBUG", "") not in ("", "0")
    try:
        return int(args._run(args) or 0)
    except KeyboardInterrupt:
        print(f"scoredensity {args.command}: interrupted", file=sys.stderr, flush=True)
        return EXIT_SIGINT
    except BrokenPipeError:  # `scoredensity ... | head`: the reader went away; nothing left to say
        try:
            sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - silence the flush at exit
        except OSError:
            pass
        return 141
    except (SystemExit, GeneratorExit):
        raise
    except Exception as e:  # every other failure: one line, a documented exit code, a traceback only on request
        return _report(args.command, e, debug)


if __name__ == "__main__":
    sys.exit(main())
