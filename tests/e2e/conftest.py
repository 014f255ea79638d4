"""Puts tests/e2e on sys.path for conftest_e2e (stock main_ppo runs of a recipe); the shared models are
fixtures of tests/conftest.py."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
