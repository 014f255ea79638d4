"""Stock main_ppo + GRPO + the toy environment through the plugin's multi-turn agent loops, on CPU."""

import os
import sys
from pathlib import Path

import pytest

from verl_hindsight.environment.data import write_env_dataset

from conftest_e2e import run_recipe  # noqa: E402  (tests/e2e is on sys.path via conftest.py)

pytestmark = pytest.mark.e2e
TESTS_DIR = Path(__file__).resolve().parents[1]


def run_main_ppo(tmp_path, overrides, extra_env=None):
    return run_recipe("cpu/toy_grpo", tmp_path, overrides, extra_env)


def test_text_env_loop_records_spans_for_every_row(format_model, tmp_path):
    train, val = write_env_dataset("toy", tmp_path / "data", max_train=16, max_val=4)
    rows = run_main_ppo(tmp_path, [f"actor_rollout_ref.model.path={format_model}", f"data.train_files={train}",
                                   f"data.val_files={val}", "trainer.total_training_steps=2"])
    assert len(rows) == 2
    for m in rows:
        assert m["hindsight/rows"] == 16  # 4 prompts x n=4 rollouts
        assert m["hindsight/rows_with_turn_records"] == 1.0
        assert m["hindsight/rows_with_action_mask"] == 1.0
        assert m["hindsight/action_tokens_on_observation"] == 0.0
        assert 0.0 < m["hindsight/action_token_frac"] < 1.0
        assert m["hindsight/turns_mean"] >= 1.0
        assert m.get("hindsight/env_failures", 0.0) == 0.0
        assert m["critic/score/max"] <= 1.0


def test_environment_faults_become_failed_trajectories_and_training_continues(format_model, tmp_path):
    from verl_hindsight.environment.data import env_rows

    import pandas as pd

    sys.path.insert(0, str(TESTS_DIR))
    import fault_envs  # noqa: F401  (registers "faulty" in this process for env_rows)

    rows = env_rows("faulty", "train")
    tasks = {"ok-0", "raise-0", "hang-0", "malformed-0"}
    rows = [r for r in rows if r["extra_info"]["task_id"] in tasks]
    (tmp_path / "data").mkdir()
    pd.DataFrame(rows).to_parquet(tmp_path / "data" / "train.parquet")
    pd.DataFrame(rows[:1]).to_parquet(tmp_path / "data" / "val.parquet")
    metrics = run_main_ppo(
        tmp_path,
        [f"actor_rollout_ref.model.path={format_model}", f"data.train_files={tmp_path / 'data' / 'train.parquet'}",
         f"data.val_files={tmp_path / 'data' / 'val.parquet'}", "trainer.total_training_steps=1",
         "hindsight.env.env_modules=[fault_envs]", "hindsight.env.step_timeout_s=3"],
        extra_env={"PYTHONPATH": str(TESTS_DIR) + os.pathsep + os.environ.get("PYTHONPATH", "")},
    )
    m = metrics[0]
    assert m["hindsight/rows"] == 16  # nothing dropped
    # every rollout of the three faulty tasks fails (4 rollouts each), each with its reason
    assert m["hindsight/env_failure/env_error"] == 4
    assert m["hindsight/env_failure/step_timeout"] == 4
    assert m["hindsight/env_failure/malformed_output"] == 4


def test_history_mode_rows_per_turn_through_main_ppo(format_model, tmp_path):
    train, val = write_env_dataset("toy", tmp_path / "data", max_train=16, max_val=4)
    rows = run_main_ppo(tmp_path, [f"actor_rollout_ref.model.path={format_model}", f"data.train_files={train}",
                                   f"data.val_files={val}", "trainer.total_training_steps=1",
                                   "hindsight.env.history_turns=2"])
    m = rows[0]
    assert m["hindsight/rows"] >= 16  # one row per turn: at least one per episode
    assert m["hindsight/rows_with_turn_records"] == 1.0 and m["hindsight/action_tokens_on_observation"] == 0.0
    assert m["hindsight/turns_mean"] * 16 == pytest.approx(m["hindsight/rows"])  # episodes x turns = rows
