"""Shared paths for the deployment tests (they read files; none needs the platform running)."""

from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCKER = ROOT / "docker"


@pytest.fixture(scope="session")
def root() -> Path:
    return ROOT
