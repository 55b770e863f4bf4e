"""The one place pneumoseg imports onnxruntime: with its telemetry off unless the user asked for it.

onnxruntime 1.32 added telemetry on Linux. From ``import onnxruntime`` on (the session is not needed)
it keeps a device id and an event store under ``~/.cache/Microsoft/DeveloperTools/.onnxruntime/``
(``$XDG_CACHE_HOME`` if set), holds a thread and three file descriptors on it, and uploads a
ProcessInfo event (OS, executable path, CPU model, memory, container type, hashed device id) and one
event per onnxruntime error with its message to ``mobile.events.data.microsoft.com``, starting about
9 s after the import (an upload to a collector that did not answer held the process's exit 4 s).
pneumoseg runs beside hospital systems, so by default it collects and sends nothing:

* before the first import it sets ``ORT_DISABLE_TELEMETRY=1`` (read once, when onnxruntime starts:
  nothing is written, started or sent) and ``ORT_TELEMETRY_DISABLED=1`` (the name later onnxruntime
  versions also document; 1.32 ignores it);
* after the import it calls ``onnxruntime.disable_telemetry_events()``, for the process that imported
  onnxruntime before pneumoseg: that stops the events logged from then on (the error events), but
  not the store, the thread or the ProcessInfo event queued at the import.

The opt-in is onnxruntime's own variable: ``ORT_DISABLE_TELEMETRY=0`` (any value onnxruntime reads as
"not disabled") in the environment before onnxruntime is first imported. A variable the user set,
either way, is never changed; one set here is inherited by the processes this one starts.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

__all__ = ["TELEMETRY_VARIABLES", "telemetry_wanted", "import_onnxruntime"]

#: the variables that turn onnxruntime's telemetry off: the one 1.32 reads, then the later name
TELEMETRY_VARIABLES = ("ORT_DISABLE_TELEMETRY", "ORT_TELEMETRY_DISABLED")

# What onnxruntime 1.32 reads as "disabled", case and surrounding blanks aside (measured: "y" and
# "On" disable; "0", "false", "no", "off", "t" leave telemetry on).
_DISABLED = frozenset({"1", "true", "yes", "y", "on"})

_events_disabled = False


def telemetry_wanted(environ: Mapping[str, str] = os.environ) -> bool:
    """True where the user opted in to onnxruntime's telemetry: one of :data:`TELEMETRY_VARIABLES`
    is set to a value onnxruntime reads as "not disabled" (``0``), and none to a disabling one.
    A blank value counts as unset: an empty ``-e ORT_DISABLE_TELEMETRY=`` is no choice."""
    values = [environ.get(name, "").strip().lower() for name in TELEMETRY_VARIABLES]
    chosen = [v for v in values if v]
    return bool(chosen) and not any(v in _DISABLED for v in chosen)


def import_onnxruntime() -> Any:
    """``import onnxruntime`` with its telemetry off unless :func:`telemetry_wanted` (see the module
    documentation). ``ImportError`` passes through: callers go through
    :func:`pneumoseg._optional.import_optional`, which tells a missing onnxruntime from a broken one."""
    global _events_disabled
    wanted = telemetry_wanted()
    if not wanted:
        for name in TELEMETRY_VARIABLES:
            if not os.environ.get(name, "").strip():
                os.environ[name] = "1"
    import onnxruntime

    # Once per process: a program that later calls enable_telemetry_events() itself keeps that choice.
    if not wanted and not _events_disabled:
        disable = getattr(onnxruntime, "disable_telemetry_events", None)  # a build without it has none to stop
        if disable is not None:
            disable()
        _events_disabled = True
    return onnxruntime
