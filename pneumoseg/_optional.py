"""Importing an optional package, telling "not installed" apart from "installed but broken".

Every ImportError used to read "needs onnxruntime: pip install ...", also where onnxruntime was
installed and failed while it loaded (a wheel built for another numpy, a missing shared library, a
half-removed install): the user was sent to install what they had. Here only a
``ModuleNotFoundError`` for the package itself counts as not installed; any other ImportError
raised while it loads is reported with its reason.
"""

from __future__ import annotations

import importlib
import traceback
from typing import Any, Callable, Optional

from .errors import InvalidInputError

__all__ = ["import_optional", "import_error_message", "not_installed"]


def not_installed(exc: ImportError, package: str) -> bool:
    """True when ``exc`` says ``package`` itself cannot be found (or is blocked by ``None`` in
    ``sys.modules``); False for an error raised while it loads, a missing dependency of it included."""
    return isinstance(exc, ModuleNotFoundError) and exc.name == package


def import_optional(package: str, *, needed_for: str, install: str,
                    load: Optional[Callable[[], Any]] = None) -> Any:
    """``package`` imported (by ``load()`` where it needs more than ``import``), or an
    :class:`pneumoseg.InvalidInputError`: "<needed_for> needs <package>, which is not installed:
    <install>" where it is absent, else one saying it is installed but failed to import, and why
    (the ImportError is kept as the cause)."""
    try:
        return load() if load is not None else importlib.import_module(package)
    except ImportError as exc:
        error = InvalidInputError(import_error_message(exc, package, needed_for=needed_for, install=install))
        raise error from (None if not_installed(exc, package) else exc)


def import_error_message(exc: ImportError, package: str, *, needed_for: str, install: str) -> str:
    """What :func:`import_optional` says about ``exc``, raised importing ``package`` (also for the
    CLI, which meets the ImportErrors of imports made without it)."""
    if not_installed(exc, package):
        return f"{needed_for} needs {package}, which is not installed: {install}"
    return (f"{needed_for} needs {package}, which is installed but failed to import ({_reason(exc)}): a broken "
            f"install, or one built for another numpy, Python or CUDA; `python -c \"import {package}\"` shows "
            "the whole error")


def _reason(exc: ImportError) -> str:
    """The error on one line; where it has no message (onnxruntime 1.18.0 under numpy 2 re-raises a
    bare ImportError from its extension), the place it was raised instead."""
    text = " ".join(str(exc).split())
    if text:
        return f"{type(exc).__name__}: {text}"
    frames = traceback.extract_tb(exc.__traceback__)
    where = f", raised at {frames[-1].filename}:{frames[-1].lineno}" if frames else ""
    return f"{type(exc).__name__} without a message{where}"
