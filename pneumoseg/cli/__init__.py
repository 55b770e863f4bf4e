"""The ``pneumoseg`` command line: ``main()`` and the one place where expected errors become messages.

Each command is a module of this package with two functions, registered in ``COMMANDS``:

- ``add_parser(subparsers)`` adds the command's parser (use the argument types of
  :mod:`pneumoseg.cli.types`, so a bad value is a one-line usage error);
- ``run(args) -> int`` does the work and returns the exit code.

Adding a command is one module and one line in ``COMMANDS``. Expected errors (bad input files or
arguments, ``pneumoseg.PneumosegError``; a path that cannot be read or written, ``OSError``; a usage
error) end the program with one line ``pneumoseg: error: ...`` on stderr and exit code 2, without a
traceback; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import NoReturn, Optional

__all__ = ["main", "build_parser", "COMMANDS", "UsageError"]

# Module names under pneumoseg.cli, in the order `pneumoseg --help` lists them.
COMMANDS = ["demo", "data", "train", "predict", "export", "evaluate"]

EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


class UsageError(Exception):
    """A command line argparse rejected; its message is one line."""


class _Parser(argparse.ArgumentParser):
    """argparse with one-line usage errors (the default prints the usage block and exits)."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{message} (see '{self.prog} --help')")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="pneumoseg", description="Pneumothorax classification and segmentation")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_Parser)
    for name in COMMANDS:
        importlib.import_module(f"{__name__}.{name}").add_parser(sub)
    return parser


def _describe_os_error(exc: OSError) -> str:
    what = exc.strerror or str(exc)
    names = [n for n in (exc.filename, exc.filename2) if n is not None]
    return f"{': '.join(str(n) for n in names)}: {what}" if names else what


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def main(argv: Optional[list[str]] = None) -> int:
    from ..errors import PneumosegError

    try:
        args = build_parser().parse_args(argv)
        return int(args.run(args))
    except UsageError as exc:
        message = str(exc)
    except PneumosegError as exc:  # bad input files or arguments: a clear message, not a traceback
        message = str(exc)
    except OSError as exc:  # permission denied, not a directory, disk full ... on the user's paths
        message = _describe_os_error(exc)
    except KeyboardInterrupt:
        print("pneumoseg: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    print(f"pneumoseg: error: {_one_line(message)}", file=sys.stderr)
    return EXIT_USAGE


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
