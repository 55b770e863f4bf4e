from __future__ import annotations

import sys
from pathlib import Path

# Benchmarks reuse the tests' input factories and markers.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from conftest import pytest_collection_modifyitems  # noqa: E402,F401
