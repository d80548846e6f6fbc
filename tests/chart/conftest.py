"""Fixtures of the chart tier (helpers live in helmlib.py)."""

from __future__ import annotations

import pytest

from .helmlib import Helm, require_tool


@pytest.fixture(scope="session")
def helm(tmp_path_factory: pytest.TempPathFactory) -> Helm:
    return Helm(require_tool("helm"), tmp_path_factory.mktemp("helm-home"))
