"""Education test fixtures: the path to the shared real datasets (skipped with a reason when absent)."""

from __future__ import annotations

from pathlib import Path

import pytest

SHARED_EDUCATION = Path(__file__).resolve().parents[3].parent / "shared" / "data" / "education"


@pytest.fixture
def shared_education() -> Path:
    """`<repo root>/../shared/data/education`; skips the test when that folder is absent."""
    if not SHARED_EDUCATION.is_dir():
        pytest.skip(f"shared data not available at {SHARED_EDUCATION} (real datasets live outside the repo)")
    return SHARED_EDUCATION
