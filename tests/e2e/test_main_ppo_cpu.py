"""Stock ``python -m verl.trainer.main_ppo`` on CPU: GRPO with the tiny model through the plugin.

The plugin is picked up through the ``verl.plugins`` entry point only (no VERL_USE_EXTERNAL_MODULES).
"""

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch

from verl_hindsight.launch import main_ppo_command
from verl_hindsight.tasks.letters import write_dataset

pytestmark = pytest.mark.e2e


def _load_safetensors_dir(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    tensors = {}
    for f in sorted(path.glob("*.safetensors")):
        tensors.update(load_file(f))
    return tensors


def test_grpo_three_steps_update_weights_and_keep_rollout_in_sync(tiny_model_dir, tmp_path):
    train, val = write_dataset(tmp_path / "data", n_train=32, n_val=8)
    metrics_path = tmp_path / "metrics.jsonl"
    ckpt_dir = tmp_path / "ckpt"
    cmd = main_ppo_command("cpu/grpo_smoke", [
        f"actor_rollout_ref.model.path={tiny_model_dir}",
        f"data.train_files={train}",
        f"data.val_files={val}",
        "trainer.total_training_steps=3",
        "trainer.save_freq=3",
        f"trainer.default_local_dir={ckpt_dir}",
        "actor_rollout_ref.actor.checkpoint.save_contents=[model,hf_model]",
    ])
    env = {k: v for k, v in os.environ.items() if k != "VERL_USE_EXTERNAL_MODULES"}
    env["VERL_FILE_LOGGER_PATH"] = str(metrics_path)
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    log = proc.stdout + proc.stderr
    (tmp_path / "verl.log").write_text(log)
    assert proc.returncode == 0, log[-5000:]

    rows = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    for r in rows:
        m = r["data"]
        # rollout (hf server) log-probs vs trainer log-probs of the same tokens, after every weight sync
        assert m["training/rollout_actor_probs_pearson_corr"] >= 0.99
        assert abs(m["rollout_corr/log_ppl_diff"]) < 1e-3
        assert m["actor/grad_norm"] > 0
        assert m["critic/score/max"] > m["critic/score/min"]  # the reward has variance: a real gradient

    hf_dirs = list(ckpt_dir.glob("global_step_3/actor/huggingface"))
    assert hf_dirs, f"no HF checkpoint under {ckpt_dir}"
    trained = _load_safetensors_dir(hf_dirs[0])
    initial = _load_safetensors_dir(Path(tiny_model_dir))
    changed = [k for k in initial if k in trained and not torch.equal(initial[k], trained[k].to(initial[k].dtype))]
    assert len(changed) >= len(initial) // 2, f"only {changed} changed"
