"""Fixtures of the integration tests (the synthetic set comes from tests/conftest.py)."""

from __future__ import annotations

import pytest

from .hydra_helpers import compose_config


@pytest.fixture
def compose_cfg():
    """``compose_cfg(config_name, overrides, output_dir)``: see :func:`hydra_helpers.compose_config`."""
    return compose_config
