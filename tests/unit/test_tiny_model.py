import hashlib

import pytest

from verl_hindsight.tiny_model import IM_END, make_tiny_model


def _digests(path):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(path.iterdir())}


def test_same_seed_gives_identical_files_and_other_seed_differs(tmp_path):
    a = make_tiny_model(tmp_path / "a", seed=3)
    b = make_tiny_model(tmp_path / "b", seed=3)
    c = make_tiny_model(tmp_path / "c", seed=4)
    assert _digests(a) == _digests(b)
    assert _digests(a)["model.safetensors"] != _digests(c)["model.safetensors"]


def test_loads_offline_as_qwen2_with_chat_template(tiny_model_dir, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from transformers import AutoConfig, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    cfg = AutoConfig.from_pretrained(tiny_model_dir)
    assert cfg.model_type == "qwen2" and cfg.vocab_size == len(tok)
    assert tok.eos_token == IM_END and cfg.eos_token_id == tok.eos_token_id
    text = tok.apply_chat_template(
        [{"role": "user", "content": "open door 1"}], tokenize=False, add_generation_prompt=True
    )
    assert text == "<|im_start|>user\nopen door 1<|im_end|>\n<|im_start|>assistant\n"


def test_chat_template_renders_tool_calls_and_tool_results(tiny_model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    messages = [
        {"role": "user", "content": "list files"},
        {"role": "assistant", "content": "", "tool_calls": [
            {"type": "function", "function": {"name": "ls", "arguments": {"a": True}}}]},
        {"role": "tool", "content": "x.txt"},
    ]
    text = tok.apply_chat_template(messages, tokenize=False, tools=[{"type": "function", "function": {"name": "ls"}}])
    assert '<tool_call>{"name": "ls", "arguments": {"a": true}}</tool_call><|im_end|>' in text
    assert "<|im_start|>user\n<tool_response>\nx.txt\n</tool_response><|im_end|>" in text
    assert "<tools>" in text


@pytest.mark.parametrize("text", ["héllo 世界 <action>go to door 2</action>", "a  b\n\tc 12345"])
def test_byte_level_round_trip(tiny_model_dir, text):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    assert tok.decode(tok.encode(text)) == text


def test_cli_writes_model(tmp_path):
    from verl_hindsight.cli import main

    assert main(["make-tiny-model", str(tmp_path / "m"), "--hidden-size", "32", "--seed", "1"]) == 0
    assert (tmp_path / "m" / "model.safetensors").exists()


def test_untied_output_layer_is_its_own_matrix(tmp_path):
    """--no-tie-word-embeddings (the demo's model): the output layer is a separate parameter that loads back."""
    import torch
    from transformers import AutoModelForCausalLM

    from verl_hindsight.cli import main

    assert main(["make-tiny-model", str(tmp_path / "m"), "--hidden-size", "32", "--no-tie-word-embeddings"]) == 0
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    assert model.config.tie_word_embeddings is False
    head, emb = model.get_output_embeddings().weight, model.get_input_embeddings().weight
    assert head.data_ptr() != emb.data_ptr() and not torch.equal(head, emb)
    tied = AutoModelForCausalLM.from_pretrained(make_tiny_model(tmp_path / "t", hidden_size=32))
    assert tied.get_output_embeddings().weight.data_ptr() == tied.get_input_embeddings().weight.data_ptr()
