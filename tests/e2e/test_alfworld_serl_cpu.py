"""SERL for two steps on generated ALFWorld games (real TextWorld engine) through stock main_ppo."""

import math

import pandas as pd
import pytest

from verl_hindsight.environment.data import env_rows

from conftest_e2e import run_recipe

pytestmark = pytest.mark.e2e
pytest.importorskip("alfworld", reason="ALFWorld is installed by the README's test command (extra `alfworld`)")


def test_serl_on_generated_alfworld_games(format_model, alfworld_default_games, tmp_path):
    # the default generated set, made before training (the env workers' start-up limit is shorter than generating
    # games) by the session fixture that the CLI test of tests/unit/test_alfworld.py checks
    kwargs = {"source": "generated", "cache_dir": alfworld_default_games[0], "max_steps": 4}
    rows = env_rows("alfworld", "train", kwargs, limit=2)
    (tmp_path / "data").mkdir()
    pd.DataFrame(rows).to_parquet(tmp_path / "data" / "train.parquet")
    pd.DataFrame(env_rows("alfworld", "val", kwargs, limit=1)).to_parquet(tmp_path / "data" / "val.parquet")
    overrides = [
        f"actor_rollout_ref.model.path={format_model}", f"data.train_files={tmp_path / 'data' / 'train.parquet'}",
        f"data.val_files={tmp_path / 'data' / 'val.parquet'}", "trainer.total_training_steps=2",
        "data.train_batch_size=2", "actor_rollout_ref.rollout.n=2", "actor_rollout_ref.actor.ppo_mini_batch_size=2",
        # history mode makes the row count vary per step: micro-batches of 1 divide any count
        "actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu=1",
        "actor_rollout_ref.ref.log_prob_micro_batch_size_per_gpu=1",
        "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=1",
        "data.max_prompt_length=1800", "data.max_response_length=32", "hindsight.env.max_turns=3",
        "hindsight.env.history_turns=2",  # SERL's ALFWorld setting: fresh prompt with the last 2 steps
        f"trainer.default_local_dir={tmp_path / 'ckpt'}",
    ]
    metrics = run_recipe("cpu/toy_serl", tmp_path, overrides)
    assert len(metrics) == 2
    for m in metrics:
        assert m.get("hindsight/env_failures", 0.0) == 0.0
        assert m["hindsight/rows_with_action_mask"] == 1.0
        # history mode: one row per turn (a fresh prompt with the last steps), so episodes x turns = rows
        assert m["hindsight/rows_with_turn_records"] == 1.0 and m["hindsight/action_tokens_on_observation"] == 0.0
        assert m["hindsight/rows"] >= 4 and m["hindsight/turns_mean"] * 4 == pytest.approx(m["hindsight/rows"])
        assert m["serl/changed_tokens_outside_hindsight_mask"] == 0.0
        for k, v in m.items():
            if k.startswith(("hindsight/", "serl/")):
                assert math.isfinite(float(v)), k
