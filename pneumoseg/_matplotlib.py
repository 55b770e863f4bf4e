"""pneumoseg's plotting, kept quiet about matplotlib's use of deprecated pyparsing names.

matplotlib before 3.10.7 calls pyparsing's camelCase names (``parseString``, ``resetCache``,
``enablePackrat``), which pyparsing 3.3 deprecates with a ``PyparsingDeprecationWarning`` (a
``DeprecationWarning`` and a ``UserWarning``) on each call: at ``import matplotlib`` and again when a
figure's fonts are parsed. Python's default filters hide it, but where warnings are shown or are
errors (``-W error``, ``python -X dev``, a test suite) every plot of ``pneumoseg train``, ``evaluate``
and ``demo`` reported it, or failed on it, though it is nothing the user or pneumoseg can change.

:func:`quiet_matplotlib` ignores exactly that warning, raised from matplotlib's own modules, while
pneumoseg plots, and puts the caller's filters back afterwards. Python before 3.14 keeps one filter
list per process, so during the call the filter is seen by every thread; a lock keeps pneumoseg's
own plotting calls from entering and leaving it out of order (which would leave it installed).
"""

from __future__ import annotations

import contextlib
import threading
import warnings
from collections.abc import Iterator
from typing import Optional

__all__ = ["quiet_matplotlib"]

# The modules whose warnings are silenced: matplotlib and its submodules (not "matplotlib_foo").
_MATPLOTLIB_MODULES = r"matplotlib(\.|$)"

_lock = threading.RLock()


def _pyparsing_deprecation() -> Optional[type[Warning]]:
    """pyparsing's deprecation warning class, or None where pyparsing (or the class: before 3.3,
    which does not warn about these names) is absent."""
    try:
        import pyparsing
    except ImportError:
        return None
    category = getattr(pyparsing, "PyparsingDeprecationWarning", None)
    return category if isinstance(category, type) and issubclass(category, Warning) else None


@contextlib.contextmanager
def quiet_matplotlib() -> Iterator[None]:
    """Import and use matplotlib inside this (also a decorator) without pyparsing's deprecation
    warnings from matplotlib's modules; every other warning reaches the caller's filters as before."""
    with _lock, warnings.catch_warnings():
        category = _pyparsing_deprecation()
        if category is not None:
            warnings.filterwarnings("ignore", category=category, module=_MATPLOTLIB_MODULES)
        yield
