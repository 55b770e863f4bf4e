from __future__ import annotations

import sys
from pathlib import Path

# Benchmarks reuse the tests' input factories and markers, and share helpers in this folder.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
sys.path.append(str(Path(__file__).resolve().parent))

from conftest import pytest_collection_modifyitems  # noqa: E402,F401
