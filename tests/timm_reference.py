"""timm's models as an outside reference, without timm: ../shared/reference/timm_reference.json holds
their state-dict names and shapes and float64 logits under weights given by a formula (its README)."""

from __future__ import annotations

import json
import math
import os
from functools import lru_cache
from pathlib import Path
from typing import Optional

import numpy as np
import torch


def reference_path() -> Optional[Path]:
    env = os.environ.get("PNEUMOSEG_TIMM_REFERENCE")
    candidates = [Path(env)] if env else []
    candidates.append(Path(__file__).resolve().parents[1].parent / "shared" / "reference" / "timm_reference.json")
    return next((c for c in candidates if c.is_file()), None)


@lru_cache(maxsize=1)
def load_reference() -> Optional[dict]:
    path = reference_path()
    return None if path is None else json.loads(path.read_text())


def formula_state_dict(entries: list) -> dict[str, torch.Tensor]:
    """The weights of the README: entries sorted by name, numbered k; sin(0.37 i + 1.3 k + 0.5) scaled
    by kind (fan-in for >= 2-D, running_var, other weights, the rest); integer entries zero."""
    state = {}
    for k, (name, shape, dtype) in enumerate(sorted(entries, key=lambda e: e[0])):
        n = int(np.prod(shape)) if shape else 1
        if "int" in dtype:
            state[name] = torch.zeros(shape, dtype=torch.int64)
            continue
        b = np.sin(0.37 * np.arange(n, dtype=np.float64) + 1.3 * k + 0.5)
        if len(shape) >= 2:
            v = b * math.sqrt(3.0 / (n / shape[0]))
        elif name.endswith("running_var"):
            v = 0.5 + 0.5 * np.abs(b)
        elif name.endswith("weight"):
            v = 1.0 + 0.1 * b
        else:
            v = 0.1 * b
        state[name] = torch.from_numpy(v.reshape(shape))
    return state


def reference_input(shape: list) -> torch.Tensor:
    n = int(np.prod(shape))
    return torch.from_numpy(np.sin(0.013 * np.arange(n, dtype=np.float64)).reshape(shape))
