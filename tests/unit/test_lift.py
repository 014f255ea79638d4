"""`verl-hindsight lift`: wrong-call perturbation, the per-source summary (hand-computed), the refusals, and the
scores against an independent reference: a plain transformers forward over the chat template's full render of
the conversation (the student) and of the same conversation with the feedback as a user turn (the teacher)."""

from __future__ import annotations

import json
import random

import pytest

from verl_hindsight.lift import Case, LiftError, _oracle, format_table, perturb_call, summarize

TOOLS = [{"type": "function", "function": {"name": "use_key", "parameters": {
    "type": "object", "properties": {"key": {"type": "string", "enum": ["A", "B", "C"]}, "n": {"type": "integer"},
                                     "loud": {"type": "boolean"}, "note": {"type": "string"}}}}},
         {"type": "function", "function": {"name": "look", "parameters": {"type": "object", "properties": {}}}}]


def _call(payload: str) -> dict:
    return json.loads(payload)["tool_calls"][0]


@pytest.mark.parametrize("seed", range(12))
def test_perturbed_call_differs_in_exactly_one_thing(seed):
    oracle = {"name": "use_key", "arguments": {"key": "B", "n": 3, "loud": True, "note": "abc"}}
    out = _call(perturb_call(json.dumps({"content": "", "tool_calls": [oracle]}), TOOLS, random.Random(seed)))
    if out["name"] != "use_key":
        assert out == {"name": "look", "arguments": oracle["arguments"]}
        return
    changed = {k for k in oracle["arguments"] if out["arguments"][k] != oracle["arguments"][k]}
    assert len(changed) == 1
    key = changed.pop()
    allowed = {"key": [["A"], ["C"]], "n": [[2], [4]], "loud": [[False]], "note": [["cba"]]}[key]
    assert [out["arguments"][key]] in allowed


def test_perturbed_call_without_arguments_or_calls():
    out = _call(perturb_call(json.dumps({"tool_calls": [{"name": "look", "arguments": {}}]}), TOOLS, random.Random(0)))
    assert out == {"name": "use_key", "arguments": {}}
    assert perturb_call(json.dumps({"content": "done", "tool_calls": []}), TOOLS, random.Random(0)) is None
    assert perturb_call(json.dumps({"tool_calls": [{"name": "look", "arguments": {}}]}), TOOLS[1:],
                        random.Random(0)) is None


def test_summary_by_hand():
    cases = [  # (student correct, student wrong, teacher correct, teacher wrong)
        Case("t0", 1, "s", "fb", -2.0, -1.0, -0.5, -1.5),  # lifts +1.5 / -0.5: fixed
        Case("t1", 0, "s", "fb", -1.0, -3.0, -2.0, -1.0),  # lifts -1.0 / +2.0: broken, wrong lifted more
        Case("t2", 2, "s", None, -1.0, -2.0),  # no feedback
        Case("t0", 1, "other", "fb", -2.0, -1.0, -2.0, -1.0),
    ]
    s = summarize("s", cases)
    assert (s.cases, s.covered) == (3, 2)
    assert s.lift_correct == pytest.approx(0.25) and s.lift_wrong == pytest.approx(0.75)
    assert s.margin_change == pytest.approx(-0.5)  # ((1.5 + 0.5) + (-1.0 - 2.0)) / 2
    assert (s.fixed, s.student_wrong_first, s.broken, s.student_right_first, s.helps_wrong_more) == (1, 1, 1, 1, 1)


def test_table_rows_by_hand_and_an_uncovered_source_left_blank():
    from verl_hindsight.lift import LiftReport

    cases = [Case("t0", 1, "s", "fb", -2.0, -1.0, -0.5, -1.5), Case("t0", 1, "analyzer", None, -2.0, -1.0)]
    report = LiftReport(env="toy", model="m", seed=0, sources=["s", "analyzer"],
                        summaries=[summarize("s", cases), summarize("analyzer", cases)], cases=cases)
    rows = format_table(report).splitlines()
    assert "| s | 1/1 | +1.50 | -0.50 | +2.00 | 1/1 | 0/0 | 0/1 |" in rows
    assert "| analyzer | 0/1 | | | | | | |" in rows  # nothing to average: blank, not nan


def test_an_env_without_oracle_is_refused_by_name():
    class NoOracle:
        def oracle_action(self):
            return None

    with pytest.raises(LiftError, match=r"environment 'x' has no oracle action at the start of task 't'"):
        _oracle(NoOracle(), "x", "t")


def test_cli_refusals(tmp_path, tiny_model_dir):
    from verl_hindsight.cli import main

    for argv, message in [
        (["lift", "nope", "--model", str(tiny_model_dir)], "unknown environment 'nope'; registered: "),
        (["lift", "toy", "--model", str(tmp_path)], f"--model {tmp_path}: not a transformers model folder"),
        (["lift", "toy", "--model", str(tiny_model_dir), "--sources", "immediate,hunch"],
         "unknown feedback source 'hunch'"),
    ]:
        with pytest.raises(SystemExit) as exc:
            main(argv)
        assert str(exc.value).startswith(f"verl-hindsight lift: {message}"), str(exc.value)


@pytest.mark.parametrize("interface", ["text", "tools"])
def test_scores_equal_a_plain_forward_over_the_rendered_conversation(tiny_model_and_tokenizer, interface):
    import torch

    from verl_hindsight.agent_loops.prompts import initial_messages
    from verl_hindsight.environment.runner import get_pool
    from verl_hindsight.lift import Scorer, play_pair

    model, tok = tiny_model_and_tokenizer
    pool = get_pool("toy", {"interface": interface})
    pair = None
    for task in pool.session().task_ids("val")[:8]:
        pair = play_pair(pool, "toy", task, random.Random(3), max_turns=10, after_wrong=2)
        if pair.turn > 0:  # a context with earlier turns in it
            break
    tool_env = interface == "tools"
    assert pair.turn > 0 and (pair.tools is not None) == tool_env
    assert pair.wrong[-1].result.done and not pair.wrong[-1].result.info.get("success")  # a wrong key ends it
    scorer = Scorer(model, tok, "qwen2")
    prompt, before = scorer.context(pair, tool_env)
    feedback = "wrong key: try another one"

    first = pair.correct[0].observation
    messages = ([{"role": "system", "content": pair.instructions}, {"role": "user", "content": first}]
                if tool_env else initial_messages(pair.instructions, first))
    for st in pair.correct[:pair.turn]:
        messages += [{"role": "assistant", "content": st.model_text},
                     {"role": "tool" if tool_env else "user", "content": st.result.observation}]

    def reference(msgs, ids, a, b):
        """The action's log-prob after the full render of ``msgs`` (+ generation prompt) and the message's ids."""
        context = tok.apply_chat_template(msgs, tools=pair.tools, add_generation_prompt=True, tokenize=True)
        context = list(context["input_ids"] if hasattr(context, "keys") else context)
        seq = context + ids[:b]
        with torch.no_grad():
            logp = model(torch.tensor([seq])).logits[0].log_softmax(-1)
        return sum(float(logp[len(context) + i - 1, seq[len(context) + i]]) for i in range(a, b)), len(context)

    teacher_messages = messages + [{"role": "user", "content": scorer.renderer.template.format(feedback=feedback)}]
    for steps in (pair.correct, pair.wrong):
        ids, a, b = scorer.action_tokens(steps[pair.turn].model_text, tool_env)
        assert tok.decode(ids[a:b]).strip() in steps[pair.turn].model_text
        response = before + ids
        student = scorer.student(prompt, response, len(before) + a, len(before) + b)
        teacher = scorer.teacher(prompt, response, len(before), len(before) + a, len(before) + b, feedback)
        ref_student, context_length = reference(messages, ids, a, b)
        assert len(prompt) + len(before) == context_length
        assert student == pytest.approx(ref_student, abs=1e-4)
        assert teacher == pytest.approx(reference(teacher_messages, ids, a, b)[0], abs=1e-4)


def test_run_lift_on_the_toy_reports_every_source(tiny_model_dir, tmp_path, capsys):
    from verl_hindsight.cli import main

    out = tmp_path / "lift.json"
    assert main(["lift", "toy", "--model", str(tiny_model_dir), "--tasks", "3", "--no-progress",
                 "--sources", "immediate,future,successful_sibling", "--json", str(out)]) == 0
    table = capsys.readouterr().out
    data = json.loads(out.read_text())
    assert data["skipped"] == [] and len(data["cases"]) == 9
    for s in data["summaries"]:
        assert s["covered"] == s["cases"] == 3, s  # a wrong key always ends the toy episode with an error
        assert f"| {s['source']} | 3/3 |" in table
    for c in data["cases"]:
        assert c["margin_change"] == pytest.approx(c["lift_correct"] - c["lift_wrong"])
    immediate = [c for c in data["cases"] if c["source"] == "immediate"]
    assert all(c["feedback"].startswith("wrong key: the ") for c in immediate)
