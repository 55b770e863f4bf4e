"""torch's CUDA sync debug mode for tests that prove a path never waits for the GPU."""

from __future__ import annotations

import contextlib
import warnings


def _set_mode(torch, mode: str) -> None:
    # Setting it warns that the mode is a prototype; under ``filterwarnings = error`` that warning would
    # escape with the mode already on and fail every later CUDA test (seen on an H200: 40 failures).
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Synchronization debug mode", category=UserWarning)
        torch.cuda.set_sync_debug_mode(mode)


@contextlib.contextmanager
def synchronisation_forbidden():
    """Sync debug mode "error" for the block (any synchronising CUDA call raises), always restored."""
    import torch

    try:
        _set_mode(torch, "error")
        yield
    finally:
        _set_mode(torch, "default")


def reset_sync_debug_mode() -> None:
    """Back to "default" if a test left the mode on (CUDA initialised only)."""
    import sys

    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_initialized() and torch.cuda.get_sync_debug_mode() != 0:
        _set_mode(torch, "default")
