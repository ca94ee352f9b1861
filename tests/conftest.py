"""Shared test fixtures: paths to the team's shared reference, tiny threads."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED = REPO_ROOT.parent / "shared"


@pytest.fixture(scope="session")
def shared_reference() -> Path:
    """`../shared/reference` from the repository root; a clear failure when it is missing."""
    ref = SHARED / "reference"
    if not ref.is_dir():
        pytest.fail(f"shared reference folder missing: expected {ref} (the team's ../shared beside the repo)")
    return ref
