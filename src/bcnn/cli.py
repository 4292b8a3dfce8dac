"""The ``bcnn`` command line: a thin wrapper over the library.

Each subcommand lives in ``bcnn._commands.<name>`` with ``HELP``, ``add_arguments(parser)`` and
``run(args) -> int``; those modules import nothing heavy at top level, so ``bcnn --help`` is fast.
Errors are one line on stderr and a non-zero exit (``--debug`` shows the traceback).
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

__all__ = ["CliError", "entry", "main"]

# name -> module; add a line here to add a subcommand.
COMMANDS: dict[str, str] = {
    "summary": "bcnn._commands.summary",
    "train": "bcnn._commands.train",
    "eval": "bcnn._commands.eval",
    "pack": "bcnn._commands.pack",
    "predict": "bcnn._commands.predict",
    "bench": "bcnn._commands.bench",
    "export": "bcnn._commands.export",
    "search-precision": "bcnn._commands.search_precision",
}


class CliError(Exception):
    """An error the CLI reports as one line (exit code 2)."""


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(
        prog="bcnn", description="Fully binary CNNs: train, evaluate, pack and run them."
    )
    parser.add_argument("--version", action="version", version=f"bcnn {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, modname in COMMANDS.items():
        mod = importlib.import_module(modname)
        p = sub.add_parser(name, help=mod.HELP, description=mod.HELP)
        p.add_argument("--debug", action="store_true", help="show tracebacks on errors")
        mod.add_arguments(p)
        p.set_defaults(_run=mod.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args._argv = list(sys.argv[1:] if argv is None else argv)  # for commands that re-run
    try:
        return int(args._run(args) or 0)
    except KeyboardInterrupt:
        print("bcnn: interrupted", file=sys.stderr)
        return 130
    except (CliError, ValueError, OSError, RuntimeError, ImportError) as e:
        if args.debug:
            raise
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"bcnn {args.command}: error: {msg}", file=sys.stderr)
        return 2


def entry() -> int:
    """The ``bcnn`` console script: :func:`main`, then a quick exit. The process ends right
    after, so the objects it made are moved out of the garbage collector's reach
    (``gc.freeze``): the interpreter's final collections would otherwise walk all of them
    (numba's registries, torch), about 0.3 s of every short command on a 2-core VM."""
    import gc

    code = main()
    sys.stdout.flush()
    gc.freeze()
    return code


if __name__ == "__main__":
    sys.exit(entry())
