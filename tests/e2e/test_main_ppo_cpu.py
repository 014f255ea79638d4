"""Stock ``python -m verl.trainer.main_ppo`` on CPU: GRPO with the tiny model through the plugin, on verl's own
default config (the shipped recipes' runs are in the other e2e files; every recipe composes in the unit tests).

The plugin is picked up through the ``verl.plugins`` entry point only (no VERL_USE_EXTERNAL_MODULES).
"""

import re
from pathlib import Path

import pytest
import torch

from conftest_e2e import run_recipe
from verl_hindsight.tasks.letters import write_dataset

pytestmark = pytest.mark.e2e


def _load_safetensors_dir(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    tensors = {}
    for f in sorted(path.glob("*.safetensors")):
        tensors.update(load_file(f))
    return tensors


def readme_cpu_settings() -> list[str]:
    """The ``key=value`` settings in the code blocks of the README's "Running stock verl on CPU" section."""
    text = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    section = text.split("## Running stock verl on CPU", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```bash\n(.*?)```", section, re.S)
    return [tok for block in blocks for tok in block.replace("\\\n", " ").split()
            if "=" in tok and not tok.startswith("-")]


def test_grpo_on_verl_s_default_config_with_only_the_readme_cpu_settings(tiny_model_dir, tmp_path):
    """Three GRPO steps on verl's own ppo_trainer config plus the README's CPU settings: the weights train, the
    rollout's log-probs match the trainer's after every weight sync, and the HF checkpoint holds trained weights."""
    settings = readme_cpu_settings()
    assert "actor_rollout_ref.rollout.name=hf" in settings
    train, val = write_dataset(tmp_path / "data", n_train=16, n_val=4)
    ckpt_dir = tmp_path / "ckpt"
    rows = run_recipe(None, tmp_path, settings + [  # what any run names, on any hardware
        f"actor_rollout_ref.model.path={tiny_model_dir}", f"data.train_files={train}", f"data.val_files={val}",
        "data.max_prompt_length=64", "data.max_response_length=16", "data.train_batch_size=4",
        "actor_rollout_ref.actor.ppo_mini_batch_size=4", "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=4",
        "actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu=4", "actor_rollout_ref.rollout.n=4",
        "algorithm.adv_estimator=grpo", "reward.custom_reward_function.path=pkg://verl_hindsight.tasks.letters",
        "reward.custom_reward_function.name=compute_score", "trainer.total_training_steps=3",
        "trainer.logger=[console,file]", "trainer.val_before_train=false", f"trainer.default_local_dir={ckpt_dir}",
        "trainer.save_freq=3", "actor_rollout_ref.actor.checkpoint.save_contents=[model,hf_model]",
    ])
    assert [m["training/global_step"] for m in rows] == [1, 2, 3]
    for m in rows:
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
