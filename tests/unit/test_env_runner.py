"""Environment protocol, worker-process runner (time limits, crash recovery), the toy env and env-check."""

import os
import sys
import time
from pathlib import Path

import pytest

from verl_hindsight.environment import make_env
from verl_hindsight.environment.runner import EnvFailure, EnvPool, RunnerLimits

TESTS_DIR = str(Path(__file__).resolve().parents[1])


@pytest.fixture()
def faulty_pool(monkeypatch):
    monkeypatch.setenv("PYTHONPATH", TESTS_DIR + os.pathsep + os.environ.get("PYTHONPATH", ""))
    pool = EnvPool("faulty", {}, RunnerLimits(step_timeout_s=2.0, episode_timeout_s=20.0, start_timeout_s=30.0),
                   import_modules=("fault_envs",))
    yield pool
    pool.close()


def play(session, task):
    session.reset(task)
    while True:
        res = session.step("A")
        if res.done:
            return res


def test_healthy_episode_and_worker_reuse(faulty_pool):
    with faulty_pool.session() as s:
        assert play(s, "ok-0").info["success"]
    with faulty_pool.session() as s:
        assert play(s, "ok-1").reward == 1.0
    assert faulty_pool.stats["workers_started"] == 1


@pytest.mark.parametrize("task, reason", [
    ("raise-1", "env_error"),
    ("malformed-0", "malformed_output"),
    ("crash-1", "worker_crashed"),
    ("hang-1", "step_timeout"),
])
def test_faults_become_reasons_and_the_next_episode_runs(faulty_pool, task, reason):
    start = time.monotonic()
    with faulty_pool.session() as s:
        with pytest.raises(EnvFailure) as info:
            play(s, task)
    assert info.value.reason == reason
    assert time.monotonic() - start < 15  # a hang is cut at the step limit, never waited out
    with faulty_pool.session() as s:  # a fresh worker replaces the failed one
        assert play(s, "ok-0").info["success"]
    assert faulty_pool.stats["workers_replaced"] >= 1


def test_episode_time_limit(monkeypatch):
    monkeypatch.setenv("PYTHONPATH", TESTS_DIR + os.pathsep + os.environ.get("PYTHONPATH", ""))
    pool = EnvPool("faulty", {}, RunnerLimits(step_timeout_s=30.0, episode_timeout_s=1.5),
                   import_modules=("fault_envs",))
    try:
        with pool.session() as s, pytest.raises(EnvFailure) as info:
            play(s, "hang-0")
        assert info.value.reason == "episode_timeout"
    finally:
        pool.close()


def test_unknown_env_fails_at_start_with_reason():
    pool = EnvPool("no-such-env", {}, RunnerLimits(start_timeout_s=30.0))
    with pool.session() as s, pytest.raises(EnvFailure) as info:
        s.reset("x")
    assert info.value.reason == "env_error" or info.value.reason == "worker_start_failed"
    assert "unknown environment 'no-such-env'" in info.value.detail


def test_environment_prints_do_not_corrupt_the_channel(monkeypatch, tmp_path):
    module = tmp_path / "chatty_env.py"
    module.write_text(
        "from verl_hindsight.environment.protocol import Environment, Observation, StepResult, register_env\n"
        "@register_env('chatty')\n"
        "class Chatty(Environment):\n"
        "    def task_ids(self, split): return ['t']\n"
        "    def reset(self, task_id):\n"
        "        print('hello from reset' * 100)\n"
        "        return Observation('o')\n"
        "    def step(self, action):\n"
        "        print('step', action)\n"
        "        return StepResult('done', 1.0, True, {'success': True})\n"
    )
    monkeypatch.setenv("PYTHONPATH", str(tmp_path) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    pool = EnvPool("chatty", {}, import_modules=("chatty_env",))
    try:
        with pool.session() as s:
            assert s.reset("t").text == "o"
            assert s.step("x").reward == 1.0
    finally:
        pool.close()


# ---------------------------------------------------------------- toy environment

def test_toy_splits_are_fixed_disjoint_and_deterministic():
    a, b = make_env("toy"), make_env("toy")
    assert a.task_ids("train") == b.task_ids("train") and a.task_ids("val") == b.task_ids("val")
    assert not set(a.task_ids("train")) & set(a.task_ids("val"))
    assert len(a.task_ids("train")) == 512 and len(a.task_ids("val")) == 128
    assert make_env("toy", task_seed=1).task_ids("val") != a.task_ids("val")


def test_toy_rule_needs_every_door_and_wrong_key_is_informative():
    env = make_env("toy", n_doors=3)
    task = env.task_ids("val")[0]
    obs = env.reset(task)
    colour = task.split("-")[0]
    assert obs.text == f"Door 1 of 3 is {colour}."
    right = env.rule[colour]
    wrong = next(k for k in env.keys if k != right)
    res = env.step(wrong)
    assert res.done and res.reward == 0.0 and not res.info["success"]
    assert res.info["error"] == f"wrong key: the {colour} door opens with {right}"
    env.reset(task)
    first = env.step(right)
    # partial reward: 1/3 per door as it opens (the return is doors opened / 3, also for a cut episode)
    assert not first.done and first.reward == pytest.approx(1 / 3)
    assert env.step(env.oracle_action()).reward == pytest.approx(1 / 3)
    third = task.split("-")[2]
    other = next(k for k in env.keys if k != env.rule[third])
    res2 = env.step(other)
    assert res2.done and res2.reward == 0.0 and not res2.info["success"]
    env.reset(task)
    rewards = [env.step(env.oracle_action()).reward for _ in range(3)]
    assert sum(rewards) == pytest.approx(1.0) and env._done


def test_toy_binary_reward_and_invalid_key():
    env = make_env("toy", n_doors=2, reward="binary")
    task = env.task_ids("train")[0]
    env.reset(task)
    inv = env.step("Z")
    assert not inv.done and inv.info["invalid_action"] and "unknown key 'Z'" in inv.observation
    assert env.step(env.oracle_action()).reward == 0.0  # partial would pay 0.5 for this door
    wrong = next(k for k in env.keys if k != env.oracle_action())
    assert env.step(wrong).reward == 0.0


@pytest.mark.parametrize("kwargs, match", [({"n_colours": 1}, "n_colours"), ({"reward": "dense"}, "reward"),
                                            ({"n_doors": 1, "n_train": 10}, "distinct tasks")])
def test_toy_bad_config_names_the_field(kwargs, match):
    with pytest.raises(ValueError, match=match):
        make_env("toy", **kwargs)


# ---------------------------------------------------------------- env-check

def test_env_check_oracle_wins_everything_and_random_is_low():
    from verl_hindsight.agent_loops.env_check import run_env_check, summarize

    oracle = run_env_check("toy", policy="oracle", tasks=40, workers=2)
    assert all(r.success for r in oracle) and summarize(oracle).splitlines()[-1] == "success: 40/40"
    random_reports = run_env_check("toy", policy="random", tasks=128, workers=2, seed=1)
    wins = sum(r.success for r in random_reports)
    # a uniform key opens each of 4 doors with p = 1/6: P(win) = 1/1296; 128 episodes almost surely win 0-1
    assert wins <= 2
    mean_turns = sum(r.turns for r in random_reports) / len(random_reports)
    assert 1.0 <= mean_turns < 1.5  # expected 1 + 1/6 + 1/36 + 1/216 ~= 1.2


def test_env_check_cli_last_line(capsys):
    from verl_hindsight.cli import main

    assert main(["env-check", "toy", "--policy", "oracle", "--tasks", "5"]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == "success: 5/5"


def test_prepare_data_rows(tmp_path):
    import json

    import pandas as pd

    from verl_hindsight.environment.data import write_env_dataset

    train, val = write_env_dataset("toy", tmp_path, {"n_doors": 3}, max_train=10, max_val=5)
    tr, va = pd.read_parquet(train), pd.read_parquet(val)
    assert len(tr) == 10 and len(va) == 5
    assert set(tr["agent_name"]) == {"hindsight_text_env"}
    info = tr["extra_info"].iloc[0]
    assert info["env"] == "toy" and json.loads(info["env_kwargs"]) == {"n_doors": 3}
    assert list(tr["extra_info"].map(lambda e: e["task_id"])) == make_env("toy", n_doors=3).task_ids("train")[:10]
    assert not set(tr["extra_info"].map(lambda e: e["task_id"])) & set(va["extra_info"].map(lambda e: e["task_id"]))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["train.parquet", "val.parquet"]  # no temporary left
