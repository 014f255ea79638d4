"""Build a tiny, random-weight Qwen2 chat model fully offline.

The model is what tests, benchmarks and the CPU demo train: a byte-level BPE tokenizer trained locally on
generated text (so no hub download), a ChatML chat template that also renders tool calls, and a small random
Qwen2 config. Everything is a pure function of ``seed``: building twice gives byte-identical files.

    verl-hindsight make-tiny-model DIR [--seed 0] [--vocab-size 512] [--hidden-size 64] [--layers 2]

or ``from verl_hindsight.tiny_model import make_tiny_model``.
"""

from __future__ import annotations

import argparse
import json
import random
import string
from dataclasses import asdict, dataclass
from pathlib import Path

PAD_TOKEN = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
# Structural markers of agent turns get their own ids so action/tool spans never merge with free text.
EXTRA_SPECIAL_TOKENS = ["<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>", "<think>", "</think>"]

# ChatML, as Qwen2.5 renders it, including the `tools` system block, assistant `tool_calls` and `tool` turns.
# Written for this project (not copied from a model card); kept close to Qwen's layout so that verl's
# `hermes` tool parser and continuous-token rendering behave as they do with real Qwen models.
CHAT_TEMPLATE = (
    "{%- if tools %}"
    "{{- '<|im_start|>system\\n' }}"
    "{%- if messages[0]['role'] == 'system' %}{{- messages[0]['content'] + '\\n\\n' }}{%- endif %}"
    "{{- '# Tools\\n\\nYou may call one or more functions. Function signatures:\\n<tools>' }}"
    "{%- for tool in tools %}{{- '\\n' + (tool | tojson) }}{%- endfor %}"
    "{{- '\\n</tools>\\n\\nFor each call return <tool_call>{\"name\": <function-name>, \"arguments\": <args-json>}"
    "</tool_call>.<|im_end|>\\n' }}"
    "{%- elif messages[0]['role'] == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if message['role'] == 'system' %}"
    "{%- if not loop.first %}{{- '<|im_start|>system\\n' + message['content'] + '<|im_end|>\\n' }}{%- endif %}"
    "{%- elif message['role'] == 'user' %}"
    "{{- '<|im_start|>user\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- elif message['role'] == 'assistant' %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- if message['content'] %}{{- message['content'] }}{%- endif %}"
    "{%- for call in message.get('tool_calls') or [] %}"
    "{%- set fn = call['function'] if call['function'] is defined else call %}"
    "{%- if (loop.first and message['content']) or not loop.first %}{{- '\\n' }}{%- endif %}"
    "{{- '<tool_call>{\"name\": \"' + fn['name'] + '\", \"arguments\": ' }}"
    "{%- if fn['arguments'] is string %}{{- fn['arguments'] }}{%- else %}{{- fn['arguments'] | tojson }}{%- endif %}"
    "{{- '}</tool_call>' }}"
    "{%- endfor %}"
    "{{- '<|im_end|>\\n' }}"
    "{%- elif message['role'] == 'tool' %}"
    "{%- if loop.first or messages[loop.index0 - 1]['role'] != 'tool' %}{{- '<|im_start|>user' }}{%- endif %}"
    "{{- '\\n<tool_response>\\n' + message['content'] + '\\n</tool_response>' }}"
    "{%- if loop.last or messages[loop.index0 + 1]['role'] != 'tool' %}{{- '<|im_end|>\\n' }}{%- endif %}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


@dataclass(frozen=True)
class TinyModelSpec:
    """Shape of the tiny model. Defaults build in a few seconds and train on 2 CPU cores."""

    seed: int = 0
    vocab_size: int = 512
    hidden_size: int = 64
    intermediate_size: int = 128
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    max_position_embeddings: int = 2048
    # False gives the output layer its own matrix. Tied, a warm start on uniformly random keys (the demo's) pulls
    # the keys' output vectors together and with them the input embeddings, so the model can no longer tell one
    # hinted key from another (docs/demo.md, "Why C and E merge: tied embeddings"); the demo's model is untied.
    tie_word_embeddings: bool = True


def _training_corpus(seed: int, n_lines: int = 4000) -> list[str]:
    """Generated text covering what the project's toy tasks and agent prompts contain.

    The tokenizer only needs good coverage of characters and common fragments; byte-level BPE can still
    encode anything (every byte has a token), so unseen text degrades gracefully to byte tokens.
    """
    rng = random.Random(seed)
    words = (
        "door key colour color red green blue yellow white black open opens opened wrong right the a an is are "
        "you your task action actions step steps turn hint feedback error invalid go take put use with from to "
        "in on at of and or not no yes please answer think reason observation success failed reward search click "
        "buy item items price option options look inventory examine heat cool clean slice fridge sink microwave "
        "countertop cabinet drawer table desk shelf apple egg mug cup plate knife lamp book pen user assistant "
        "system tool tools function call calls arguments name result results value true false null"
    ).split()
    lines = []
    for _ in range(n_lines):
        kind = rng.random()
        if kind < 0.45:
            lines.append(" ".join(rng.choice(words) for _ in range(rng.randint(3, 14))))
        elif kind < 0.6:
            a, b = rng.randint(0, 999), rng.randint(0, 999)
            lines.append(f"{a} + {b} = {a + b}; {a} * {b % 50} = {a * (b % 50)}")
        elif kind < 0.75:
            w = rng.choice(words)
            lines.append(f"<action>{w} {rng.randint(1, 9)}</action> <think>{' '.join(rng.sample(words, 4))}</think>")
        elif kind < 0.85:
            name = rng.choice(words)
            lines.append(json.dumps({"name": name, "arguments": {rng.choice(words): rng.randint(0, 99)}}))
        else:
            lines.append("".join(rng.choice(string.ascii_letters + string.digits + string.punctuation + " ")
                                 for _ in range(rng.randint(5, 40))))
    return lines


def build_tokenizer(spec: TinyModelSpec):
    """Train a byte-level BPE on the generated corpus and wrap it as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    special = [PAD_TOKEN, IM_START, IM_END, *EXTRA_SPECIAL_TOKENS]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=spec.vocab_size,
        special_tokens=special,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_training_corpus(spec.seed), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=None,
        eos_token=IM_END,
        pad_token=PAD_TOKEN,
        additional_special_tokens=EXTRA_SPECIAL_TOKENS,
        model_max_length=spec.max_position_embeddings,
        padding_side="left",
        clean_up_tokenization_spaces=False,
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def make_tiny_model(output_dir: str | Path, spec: TinyModelSpec | None = None, **overrides) -> Path:
    """Write tokenizer, config, generation config and random weights of a tiny Qwen2 model to ``output_dir``.

    ``overrides`` are TinyModelSpec fields, e.g. ``make_tiny_model(d, seed=3, hidden_size=32)``.
    Returns the output directory.
    """
    import torch
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    spec = spec or TinyModelSpec()
    if overrides:
        spec = TinyModelSpec(**{**asdict(spec), **overrides})
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)

    tokenizer = build_tokenizer(spec)
    tokenizer.save_pretrained(out)

    eos_id = tokenizer.convert_tokens_to_ids(IM_END)
    pad_id = tokenizer.convert_tokens_to_ids(PAD_TOKEN)
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_hidden_layers,
        num_attention_heads=spec.num_attention_heads,
        num_key_value_heads=spec.num_key_value_heads,
        max_position_embeddings=spec.max_position_embeddings,
        tie_word_embeddings=spec.tie_word_embeddings,
        bos_token_id=eos_id,
        eos_token_id=eos_id,
        pad_token_id=pad_id,
        torch_dtype="float32",
        use_cache=True,
    )
    # A private generator keeps the caller's global RNG state untouched and makes weights depend on seed only.
    state = torch.random.get_rng_state()
    try:
        torch.manual_seed(spec.seed)
        model = Qwen2ForCausalLM(config)
    finally:
        torch.random.set_rng_state(state)
    model.generation_config = GenerationConfig(eos_token_id=eos_id, pad_token_id=pad_id, bos_token_id=eos_id)
    model.save_pretrained(out, safe_serialization=True)
    (out / "tiny_model_spec.json").write_text(json.dumps(asdict(spec), indent=2, sort_keys=True) + "\n")
    return out


# short forms of the spec's field names on the command line (the long forms work too)
_CLI_ALIASES = {"num_hidden_layers": "--layers", "num_attention_heads": "--heads", "num_key_value_heads": "--kv-heads"}


def add_cli_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("output_dir", help="directory to write the model into (created if missing)")
    for field, default in asdict(TinyModelSpec()).items():
        names = [f"--{field.replace('_', '-')}", *([_CLI_ALIASES[field]] if field in _CLI_ALIASES else [])]
        if isinstance(default, bool):
            parser.add_argument(*names, action=argparse.BooleanOptionalAction, default=default, dest=field,
                                help=f"(default {default})")
        else:
            parser.add_argument(*names, type=int, default=default, dest=field, help=f"(default {default})")


def run_cli(args: argparse.Namespace) -> int:
    spec = TinyModelSpec(**{k: getattr(args, k) for k in asdict(TinyModelSpec())})
    out = make_tiny_model(args.output_dir, spec)
    print(f"tiny model written to {out}")
    return 0
