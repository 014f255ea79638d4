"""HINT-SD for one step on a real BFCL task (2 rollouts) through stock main_ppo, with the tiny model.

Rewards are 0 with a random model; what must run is the tool-calling loop on BFCL's real backends, the policy as
its own analyzer through the rollout server, the parse-failure accounting and the hindsight metrics.
"""

import math

import pandas as pd
import pytest

from verl_hindsight.environment.data import env_rows
from verl_hindsight.tiny_model import make_tiny_model

from conftest_e2e import run_recipe

pytestmark = pytest.mark.e2e
pytest.importorskip("bfcl_eval", reason="BFCL is installed by the README's test command "
                    "(pip install --no-deps -r requirements/benchmarks-nodeps.txt)")


def test_hint_sd_runs_on_bfcl_tasks(tmp_path):
    # BFCL prompts carry the task's function docs: ~7-12k tokens with the tiny tokenizer
    model = make_tiny_model(tmp_path / "model", max_position_embeddings=16384)
    rows = env_rows("bfcl", "val", {"category": "base"}, limit=1)
    assert {r["agent_name"] for r in rows} == {"hindsight_tool_env"}
    (tmp_path / "data").mkdir()
    pd.DataFrame(rows).to_parquet(tmp_path / "data" / "train.parquet")
    pd.DataFrame(rows).to_parquet(tmp_path / "data" / "val.parquet")
    overrides = [
        f"actor_rollout_ref.model.path={model}", f"data.train_files={tmp_path / 'data' / 'train.parquet'}",
        f"data.val_files={tmp_path / 'data' / 'val.parquet'}", "trainer.total_training_steps=1",
        "data.train_batch_size=1", "actor_rollout_ref.rollout.n=2", "actor_rollout_ref.actor.ppo_mini_batch_size=1",
        # one task, 2 rows per step: micro-batches must divide them
        "actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu=1",
        "actor_rollout_ref.ref.log_prob_micro_batch_size_per_gpu=1",
        "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=1",
        "data.max_prompt_length=14000", "data.max_response_length=48",
        "actor_rollout_ref.rollout.agent.default_agent_loop=hindsight_tool_env",
        "hindsight.env.max_turns=2", "hindsight.analyzer.role=analyzer", "hindsight.analyzer.max_tokens=32",
        "hindsight.feedback.source=analyzer", "hindsight.targets.turns=analyzer_topk",
        f"trainer.default_local_dir={tmp_path / 'ckpt'}",
    ]
    (m,) = run_recipe("cpu/toy_hint_sd", tmp_path, overrides)
    assert m["hindsight/rows"] == 2
    assert m.get("hindsight/env_failures", 0.0) == 0.0
    assert m["hindsight/env_success"] == 0.0
    failed_episodes = 2
    assert m["hindsight/analyzer_calls"] == failed_episodes
    assert m["hindsight/analyzer_parse_failures"] <= failed_episodes
    # every call is accounted for: parsed, a counted parse failure, or a counted answer error
    assert sum(v for k, v in m.items() if k.startswith("hindsight/analyzer_failure/")) == \
        m["hindsight/analyzer_parse_failures"] + m["hindsight/analyzer_failure/answer_error"]
    for k, v in m.items():
        if k.startswith("hindsight/"):
            assert math.isfinite(float(v)), k
