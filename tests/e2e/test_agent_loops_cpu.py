"""Stock main_ppo + GRPO through the plugin's multi-turn agent loops, on CPU, with environments that fail.

The text loop's spans on the toy are checked on the quick demo's runs (test_demo_quick.py), history mode (one row
per turn) on ALFWorld (test_alfworld_serl_cpu.py).
"""

import os
import sys
from pathlib import Path

import pytest

from conftest_e2e import run_recipe  # noqa: E402  (tests/e2e is on sys.path via conftest.py)

pytestmark = pytest.mark.e2e
TESTS_DIR = Path(__file__).resolve().parents[1]


def run_main_ppo(tmp_path, overrides, extra_env=None):
    return run_recipe("cpu/toy_grpo", tmp_path, overrides, extra_env)


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
