"""Text-level tool-call parsing (spans, malformed calls) and the hindsight trainer's rollout metrics."""

import json

import pytest
import torch

from verl_hindsight.agent_loops.tool_calls import format_tool_calls, parse_tool_calls, tool_payload


def test_tool_calls_are_located_and_parsed():
    text = 'I will open it.<tool_call>{"name": "use_key", "arguments": {"key": "C"}}</tool_call><|im_end|>'
    p = parse_tool_calls(text)
    assert p.error is None and p.calls == [{"name": "use_key", "arguments": {"key": "C"}}]
    assert text[p.char_span[0]:p.char_span[1]] == '<tool_call>{"name": "use_key", "arguments": {"key": "C"}}</tool_call>'
    assert p.content == "I will open it.<|im_end|>"


def test_two_calls_span_both():
    calls = [{"name": "a", "arguments": {}}, {"name": "b", "arguments": {"x": 1}}]
    text = "x" + format_tool_calls(calls) + " tail"
    p = parse_tool_calls(text)
    assert p.calls == calls and p.char_span == (1, len(text) - len(" tail"))


@pytest.mark.parametrize("text", [
    '<tool_call>{"name": "use_key", "arguments": </tool_call>',       # invalid JSON
    '<tool_call>{"name": "use_key"}</tool_call>',                      # no arguments
    '<tool_call>{"name": 3, "arguments": {}}</tool_call>',             # name not a string
    '<tool_call>["use_key", {"key": "A"}]</tool_call>',                # not an object
    '<tool_call>{"name": "use_key", "arguments": {"key": "A"}}',       # unclosed
])
def test_malformed_calls_are_errors_with_a_span(text):
    p = parse_tool_calls(text)
    assert p.error == "unparseable_tool_call" and p.calls == [] and p.char_span is not None


def test_truncated_call_and_plain_message():
    p = parse_tool_calls('<tool_call>{"name": "use_k', truncated=True)
    assert p.error == "truncated_action" and p.char_span == (0, len('<tool_call>{"name": "use_k'))
    plain = parse_tool_calls("no tools needed")
    assert plain.error is None and plain.calls == [] and plain.char_span is None


def test_payload_round_trip_through_the_toy_tools_env():
    from verl_hindsight.environment import make_env

    env = make_env("toy", interface="tools")
    assert env.tools()[0]["function"]["name"] == "use_key"
    env.reset(env.task_ids("val")[0])
    oracle = json.loads(env.oracle_action())
    parsed = parse_tool_calls(format_tool_calls(oracle["tool_calls"]))
    res = env.step(tool_payload(parsed.content, parsed.calls))
    assert not res.info.get("invalid_action") and res.reward >= 0
    bad = env.step(tool_payload("", [{"name": "other", "arguments": {}}]))
    assert bad.info["invalid_action"] and "use_key" in bad.info["error"]


def test_env_check_tool_interface_oracle():
    from verl_hindsight.agent_loops.env_check import run_env_check

    reports = run_env_check("toy", policy="oracle", tasks=10, env_kwargs={"interface": "tools"})
    assert all(r.success for r in reports)
    assert any("<tool_call>" in m["content"] for m in reports[0].transcript if m["role"] == "assistant")


def test_rollout_record_metrics_count_spans_and_failures():
    from verl_hindsight.trainer.rollout_metrics import rollout_record_metrics

    response_mask = [torch.tensor([1, 1, 1, 0, 0, 1, 1]), torch.tensor([1, 1, 0])]
    action_mask = [torch.tensor([0, 1, 1, 0, 0, 0, 1]), torch.tensor([0, 0, 0])]
    extra = [
        {"hs_turns": [{}, {}], "hs_env": {"success": True, "return": 1.0, "turns": 2, "invalid_actions": 0,
                                         "failure": ""}},
        {"hs_turns": [], "hs_env": {"success": False, "return": 0.0, "turns": 1, "invalid_actions": 1,
                                    "failure": "step_timeout"}},
    ]
    m = rollout_record_metrics(action_mask, response_mask, extra)
    assert m["hindsight/rows_with_turn_records"] == 1.0
    assert m["hindsight/action_token_frac"] == pytest.approx(3 / 7)
    assert m["hindsight/action_tokens_on_observation"] == 0
    assert m["hindsight/env_success"] == 0.5 and m["hindsight/invalid_action_rate"] == pytest.approx(1 / 3)
    assert m["hindsight/env_failure/step_timeout"] == 1
    leaked = rollout_record_metrics([torch.tensor([0, 0, 0, 1, 0, 0, 0]), torch.tensor([0, 0, 0])],
                                    response_mask, extra)
    assert leaked["hindsight/action_tokens_on_observation"] == 1
    padded = rollout_record_metrics(action_mask + [torch.tensor([1, 1])], response_mask + [torch.tensor([0])],
                                    extra + [extra[0]], is_padding=[False, False, True])
    assert padded == m  # verl's synthetic padding rows copy a real row's fields: they are left out
    missing = rollout_record_metrics(None, response_mask, [{}, {}])
    assert missing["hindsight/rows_with_action_mask"] == 0.0 and missing["hindsight/rows_with_turn_records"] == 0.0


def test_episodes_cut_by_the_token_budget_are_counted_and_warned_once(caplog):
    from verl_hindsight.trainer import rollout_metrics

    def env(cut):
        return {"hs_turns": [{}], "hs_env": {"success": False, "return": 0.25, "turns": 3, "invalid_actions": 0,
                                             "failure": "", "cut": cut}}

    mask = [torch.tensor([1, 1])] * 4
    rollout_metrics._budget_warned = False
    with caplog.at_level("WARNING", logger=rollout_metrics.__name__):
        m = rollout_metrics.rollout_record_metrics(
            mask, mask, [env("response_length"), env("max_turns"), env(""), env("response_length")])
        again = rollout_metrics.rollout_record_metrics(mask, mask, [env("response_length")] * 4)
    assert m["hindsight/episode_cut/response_length"] == 0.5 and m["hindsight/episode_cut/max_turns"] == 0.25
    assert again["hindsight/episode_cut/response_length"] == 1.0
    warnings = [r.getMessage() for r in caplog.records if "data.max_response_length" in r.getMessage()]
    assert len(warnings) == 1 and warnings[0].startswith("50% of this step's episodes")
