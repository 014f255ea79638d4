"""The shipped GPU recipes are sized for one node of 8 x 80 GB GPUs, their launch scripts check the fit before
anything starts, and the start-time checks refuse token budgets and attention backends that would fail in the
workers."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from verl_hindsight.config import check_attention_backend, load_hindsight_config
from verl_hindsight.launch import gpu_recipe_names as gpu_recipes, recipes_dir
from verl_hindsight.plan import PlanInputError, compose_recipe, plan, validate

REPO = Path(__file__).resolve().parents[2]
DATA = ["data.train_files=x", "data.val_files=y"]


def test_the_recipe_list_is_what_ships():
    recipes = gpu_recipes()
    assert len(recipes) == 33 and {"serl", "alfworld/serl_lora", "appworld/hint_sd", "tau/hero"} <= set(recipes)
    on_disk = {p.relative_to(recipes_dir()).with_suffix("").as_posix() for p in recipes_dir().rglob("*.yaml")}
    assert on_disk - set(recipes) == {p for p in on_disk if p.startswith(("cpu/", "common/", "methods/"))} | {
        "hindsight_defaults"}


@pytest.mark.parametrize("recipe", gpu_recipes())
def test_every_gpu_recipe_is_sized_for_one_node_of_eight_80gb_gpus(recipe):
    cfg = compose_recipe(recipe, DATA)
    validate(cfg)
    row = cfg.data.max_prompt_length + cfg.data.max_response_length
    arr = cfg.actor_rollout_ref
    assert cfg.trainer.n_gpus_per_node == 8 and cfg.trainer.nnodes == 1
    # vLLM sizes its KV cache for one whole row, not the model's context (262k tokens for Qwen3-4B-2507)
    assert arr.rollout.max_model_len == row
    # micro-batches by tokens; every pass (update, actor and reference log-probs) holds at least one whole row
    assert arr.actor.use_dynamic_bsz and arr.rollout.log_prob_use_dynamic_bsz and arr.ref.log_prob_use_dynamic_bsz
    for budget in (arr.actor.ppo_max_token_len_per_gpu, arr.rollout.log_prob_max_token_len_per_gpu,
                   arr.ref.log_prob_max_token_len_per_gpu):
        assert budget >= row
    assert arr.model.override_config.attn_implementation == "sdpa"  # what a plain `.[vllm]` install runs
    result = plan(cfg, None, 80)
    assert result.gpus_per_node == 8 and result.fits, result.verdict


def test_every_env_recipe_has_a_launch_script_and_every_script_a_recipe():
    scripts = sorted(p.relative_to(REPO / "examples").as_posix() for p in (REPO / "examples").glob("*/run_*.sh"))
    assert scripts == sorted(f"{r.split('/')[0]}/run_{r.split('/')[1]}.sh" for r in gpu_recipes() if "/" in r)
    for script in scripts:
        env, method = script.removesuffix(".sh").split("/run_")
        text = (REPO / "examples" / script).read_text()
        assert f'run_recipe.sh" {env} {method} "$@"' in text, script


def _launch(script: str, tmp_path: Path, env: dict, *overrides: str) -> subprocess.CompletedProcess:
    data = tmp_path / "data"
    data.mkdir(exist_ok=True)
    for split in ("train", "val"):
        (data / f"{split}.parquet").touch()
    bin_dir = str(Path(sys.executable).parent)  # verl-hindsight and python3 of this environment
    run_env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "DRY_RUN": "1", "GPU_MEM": "80",
               "DATA_DIR": str(data), **env}
    return subprocess.run(["bash", str(REPO / "examples" / script), *overrides], env=run_env, capture_output=True,
                          text=True, timeout=300)


def test_a_launch_script_checks_the_fit_and_prints_main_ppos_command(tmp_path):
    out = _launch("tau/run_hint_sd.sh", tmp_path, {}, "actor_rollout_ref.actor.optim.lr=2e-6")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    assert lines[-2].startswith("fits:")
    command = lines[-1]
    assert command.startswith("python3 -m verl.trainer.main_ppo --config-path ")
    assert re.search(r"recipes/tau --config-name hint_sd ", command)
    for part in ("trainer.n_gpus_per_node=8", "trainer.nnodes=1", "trainer.logger=[console,wandb]",
                 "trainer.experiment_name=tau_hint_sd", "actor_rollout_ref.actor.optim.lr=2e-6"):
        assert part in command.split(), part


def test_a_launch_script_stops_with_the_planners_reason_before_anything_starts(tmp_path):
    out = _launch("alfworld/run_serl.sh", tmp_path, {"N_GPUS": "1"},
                  "actor_rollout_ref.rollout.tensor_model_parallel_size=1")
    assert out.returncode == 1
    last = out.stdout.strip().splitlines()[-1]
    assert last.startswith("does not fit: ") and "the run fits on 4 (trainer.n_gpus_per_node=4)" in last
    assert "main_ppo" not in out.stdout  # the training command was never reached
    missing = _launch("alfworld/run_serl.sh", tmp_path, {"DATA_DIR": str(tmp_path / "nowhere")})
    assert missing.returncode == 1 and "verl-hindsight prepare-data alfworld" in missing.stderr


# --- start-time refusals ------------------------------------------------------------------------------------------

def changed(recipe: str, **keys):
    """A shipped recipe's config with ``keys`` (dotted, ``__`` for ``.``) changed after composition: what the
    trainer's start-time check sees for a run launched with those overrides."""
    from omegaconf import OmegaConf, open_dict

    cfg = compose_recipe(recipe, DATA)
    with open_dict(cfg):
        for key, value in keys.items():
            OmegaConf.update(cfg, key.replace("__", "."), value, force_add=True)
    return cfg


@pytest.mark.parametrize("key, budget", [
    ("actor_rollout_ref.actor.ppo_max_token_len_per_gpu", 8192),
    ("actor_rollout_ref.rollout.log_prob_max_token_len_per_gpu", 12000),
    ("actor_rollout_ref.ref.log_prob_max_token_len_per_gpu", 16383),
])
def test_a_token_budget_below_one_row_is_refused_naming_the_key(key, budget):
    message = (rf"{re.escape(key)}={budget} \(x Ulysses SP 1\) is below the longest of its .*\(prompt 8192 \+ "
               rf"response 8192 = 16384 tokens\).* set {re.escape(key)} >= 16384$")
    with pytest.raises(ValueError, match="^" + message):  # the trainer, before any worker starts
        load_hindsight_config(changed("tau/hint_sd", **{key.replace(".", "__"): budget}))
    with pytest.raises(PlanInputError, match=message):  # the planner, as an invalid config
        compose_recipe("tau/hint_sd", [*DATA, f"{key}={budget}"])


def test_token_budgets_count_ulysses_sp_teacher_length_and_only_apply_to_dynamic_batches():
    # two SP ranks share a row: half the budget holds it (the ref's SP follows the actor's)
    compose_recipe("tau/hint_sd", [*DATA, "actor_rollout_ref.actor.ppo_max_token_len_per_gpu=8192",
                                   "actor_rollout_ref.actor.ulysses_sequence_parallel_size=2"])
    # a teacher sequence longer than a row must fit the passes that score it, not the update
    with pytest.raises(ValueError, match=r"^actor_rollout_ref\.rollout\.log_prob_max_token_len_per_gpu=32768 .*"
                                         r"hindsight\.teacher\.max_length=40000 = 40000 tokens"):
        load_hindsight_config(changed("tau/hint_sd", hindsight__teacher__max_length=40000))
    # GRPO scores no teacher sequences
    load_hindsight_config(changed("tau/grpo", hindsight__teacher__max_length=40000))
    # fixed micro-batches have no token budget
    load_hindsight_config(changed("tau/hint_sd", actor_rollout_ref__actor__use_dynamic_bsz=False,
                                  actor_rollout_ref__rollout__log_prob_use_dynamic_bsz=False,
                                  actor_rollout_ref__ref__log_prob_use_dynamic_bsz=False,
                                  actor_rollout_ref__actor__ppo_max_token_len_per_gpu=100))


def _installed(*modules):
    return lambda name: object() if name in modules else None


def test_flash_attention_without_its_package_is_refused_at_start():
    cfg = compose_recipe("grpo", [*DATA, "actor_rollout_ref.model.override_config.attn_implementation=flash_attention_2"])
    with pytest.raises(ValueError, match=r"^actor_rollout_ref\.model\.override_config\.attn_implementation="
                                         r"flash_attention_2 needs the flash_attn module, which is not installed: "
                                         r".*attn_implementation=sdpa"):
        check_attention_backend(cfg, find_spec=_installed())
    check_attention_backend(cfg, find_spec=_installed("flash_attn"))
    check_attention_backend(cfg, find_spec=_installed("kernels"))  # transformers' hub kernels stand in for it
    check_attention_backend(compose_recipe("grpo", DATA), find_spec=_installed())  # the recipes' sdpa
    # verl's default when the recipe does not say: flash_attention_2
    unset = {"trainer": {"device": "cuda"}, "actor_rollout_ref": {"model": {"override_config": {}}}}
    with pytest.raises(ValueError, match="flash_attention_2 \\(verl's default: the key is unset\\) needs"):
        check_attention_backend(unset, find_spec=_installed())
    # the CPU runtime swaps in SDPA itself
    check_attention_backend({**unset, "trainer": {"device": "cpu"}}, find_spec=_installed())
