"""The ``pneumoseg`` command line: ``main()`` and the one place where expected errors become messages.

Each command is a module of this package with two functions, registered in ``COMMANDS``:

- ``add_parser(subparsers)`` adds the command's parser (use the argument types of
  :mod:`pneumoseg.cli.types`, so a bad value is a one-line usage error);
- ``run(args) -> int`` does the work and returns the exit code.

Adding a command is one module and one line in ``COMMANDS``. Expected errors (bad input files or
arguments, ``pneumoseg.PneumosegError``; a path that cannot be read or written, ``OSError``; a usage
error) end the program with one line ``pneumoseg: error: ...`` on stderr and exit code 2, without a
traceback; anything else is a bug and keeps its traceback. Ctrl-C (SIGINT) and SIGTERM (``kill``, a
job scheduler, a container stop) unwind the command the same way, so temporary files and partly
filled outputs are removed, and end it with one line and exit code 130 or 143.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import signal
import sys
import threading
from typing import NoReturn, Optional

__all__ = ["main", "build_parser", "COMMANDS", "UsageError"]

# Module names under pneumoseg.cli, in the order `pneumoseg --help` lists them.
COMMANDS = ["demo", "data", "train", "predict", "listen", "export", "evaluate", "tune"]

EXIT_USAGE = 2
EXIT_INTERRUPTED = 130
EXIT_TERMINATED = 128 + signal.SIGTERM


class _Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the program is, as Ctrl-C raises KeyboardInterrupt. A subclass of it, so
    that every cleanup written for an interrupt runs, and DataLoader worker processes (which inherit
    the handler) end quietly as they do on Ctrl-C."""


def _raise_terminated(signum, frame) -> None:
    raise _Terminated()


@contextlib.contextmanager
def _sigterm_unwinds():
    """While a command runs, SIGTERM unwinds it like Ctrl-C. Its default action ends the process on
    the spot: no ``finally`` or ``except`` runs, so temporary files and a partly filled cache were left
    under the output folder, which the next run then refused as someone else's files."""
    if threading.current_thread() is not threading.main_thread():  # signal handlers belong to the main thread
        yield
        return
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def _data_warnings_on_one_line():
    """pneumoseg's own DataWarnings (DICOMs without a CSV row, files skipped) read as one line,
    ``pneumoseg: warning: ...``, like its errors, instead of Python's "file:line: DataWarning:" and
    the source line that raised it. Only the formatting changes: filters and recorders see them as
    before."""
    import warnings

    from ..errors import DataWarning

    previous = warnings.formatwarning

    def formatwarning(message, category, filename, lineno, line=None):
        if isinstance(category, type) and issubclass(category, DataWarning):
            return f"pneumoseg: warning: {_one_line(message)}\n"
        return previous(message, category, filename, lineno, line)

    warnings.formatwarning = formatwarning
    try:
        yield
    finally:
        warnings.formatwarning = previous


class UsageError(Exception):
    """A command line argparse rejected; its message is one line."""


class _Parser(argparse.ArgumentParser):
    """argparse with one-line usage errors (the default prints the usage block and exits)."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{message} (see '{self.prog} --help')")


def build_parser() -> argparse.ArgumentParser:
    from .. import __version__

    parser = _Parser(prog="pneumoseg", description="Pneumothorax classification and segmentation")
    parser.add_argument("--version", action="version", version=f"pneumoseg {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_Parser)
    for name in COMMANDS:
        importlib.import_module(f"{__name__}.{name}").add_parser(sub)
    return parser


def _describe_os_error(exc: OSError) -> str:
    what = exc.strerror or str(exc)
    names = [n for n in (exc.filename, exc.filename2) if n is not None]
    return f"{': '.join(str(n) for n in names)}: {what}" if names else what


def _one_line(text: str) -> str:
    # a file name's undecodable bytes (surrogate escapes) printed as \udcXX: a stream that encodes
    # strictly (pytest's capture, a redirected stderr under some locales) would raise on them
    return " ".join(str(text).split()).encode("utf-8", "backslashreplace").decode("utf-8")


def _close_progress_bars() -> None:
    """Close the progress bars the work left open when it stopped inside them: the message would
    otherwise be printed on the end of a bar's line."""
    tqdm_module = sys.modules.get("tqdm")
    for bar in list(getattr(getattr(tqdm_module, "tqdm", None), "_instances", ()) or ()):
        with contextlib.suppress(Exception):
            bar.close()


# Optional packages a command may need, and how to get them: a missing one is a setup error with one
# line, not a traceback (torch is deliberately not a dependency of the core package).
_OPTIONAL_PACKAGES = {
    "torch": "install the torch build you want first (pip install torch), as README's Quick start does",
    "onnx": "pip install 'pneumoseg[onnx]'",
    "onnxscript": "pip install 'pneumoseg[onnx]'",
    "onnxruntime": "pip install 'pneumoseg[onnx]'",
    "matplotlib": "pip install 'pneumoseg[train]'",
    "cupy": "pip install 'pneumoseg[cuda]'",
}


def main(argv: Optional[list[str]] = None) -> int:
    from ..errors import PneumosegError

    try:
        with _sigterm_unwinds(), _data_warnings_on_one_line():
            args = build_parser().parse_args(argv)
            return int(args.run(args))
    except UsageError as exc:
        message = str(exc)
    except PneumosegError as exc:  # bad input files or arguments: a clear message, not a traceback
        message = str(exc)
    except ModuleNotFoundError as exc:
        from .._optional import import_error_message

        package = (exc.name or "").split(".")[0]
        if package not in _OPTIONAL_PACKAGES:
            raise
        # "matplotlib.ft2font" missing is a broken matplotlib, not a missing one
        message = import_error_message(exc, package, needed_for="this command", install=_OPTIONAL_PACKAGES[package])
    except OSError as exc:  # permission denied, not a directory, disk full ... on the user's paths
        message = _describe_os_error(exc)
    except _Terminated:
        _close_progress_bars()
        print("pneumoseg: terminated", file=sys.stderr)
        return EXIT_TERMINATED
    except KeyboardInterrupt:
        _close_progress_bars()
        print("pneumoseg: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    _close_progress_bars()
    print(f"pneumoseg: error: {_one_line(message)}", file=sys.stderr)
    return EXIT_USAGE


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
