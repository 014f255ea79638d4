"""Shared by the end-to-end tests: a format-warm-started tiny model, and stock main_ppo runs of a recipe."""

import sys
from pathlib import Path

import pytest

E2E_DIR = Path(__file__).resolve().parent
TESTS_DIR = E2E_DIR.parent
sys.path.insert(0, str(E2E_DIR))


@pytest.fixture(scope="session")
def format_model(tiny_model_dir, tmp_path_factory):
    sys.path.insert(0, str(TESTS_DIR))
    from format_sft import format_sft

    return format_sft(tiny_model_dir, tmp_path_factory.mktemp("format_model"))
