"""The GPU smoke script's dry run (every check's config composes as main_ppo builds it) and its verdicts."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest

_SPEC = importlib.util.spec_from_file_location(
    "gpu_smoke", Path(__file__).resolve().parents[2] / "benchmarks" / "gpu_smoke.py")
smoke = importlib.util.module_from_spec(_SPEC)
sys.modules["gpu_smoke"] = smoke  # its dataclasses look their module up while the class is built
_SPEC.loader.exec_module(smoke)


def test_dry_run_composes_every_check_with_the_shipped_gpu_recipes(tmp_path, capsys):
    assert smoke.main(["--dry-run", "--workdir", str(tmp_path), "--rollout", "vllm"]) == 0
    out = capsys.readouterr().out
    for check in smoke.CHECKS:
        assert f"PASS {check.name} composes" in out
        assert f"--config-name {check.recipe} " in out
    assert "actor_rollout_ref.rollout.name=vllm" in out
    cfg = smoke.compose(smoke.CHECKS[2], smoke.toy_overrides(tmp_path / "tiny_model", tmp_path / "toy_data", "vllm"),
                        tmp_path / "run")
    # what the smoke exercises is the GPU recipes' own path: no KL (teacher in the reference role), FSDP2, vLLM
    assert not cfg.actor_rollout_ref.actor.use_kl_loss and cfg.trainer.device == "cuda"
    assert cfg.hindsight.teacher.kind == "ema" and cfg.actor_rollout_ref.rollout.max_model_len == 512
    # the recipes' token-budget batching (one toy row per micro-batch) and attention, on one GPU
    assert cfg.actor_rollout_ref.actor.use_dynamic_bsz and cfg.actor_rollout_ref.actor.ppo_max_token_len_per_gpu == 512
    assert cfg.actor_rollout_ref.model.override_config.attn_implementation == "sdpa"
    assert cfg.trainer.n_gpus_per_node == 1


def test_dry_run_reports_a_config_that_does_not_compose(tmp_path, capsys):
    failed = smoke.main(["--dry-run", "--workdir", str(tmp_path), "--only", "grpo",
                         "--override", "hindsight.teacher.kind=nonsense"])
    assert failed == 1
    assert "FAIL grpo composes" in capsys.readouterr().out


def _write_run(run_dir: Path, rows: list[dict], log: str = "") -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "verl.log").write_text(log)
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "data": d}) + "\n" for s, d in rows))


@pytest.mark.parametrize("rows, rc, expected", [
    ([(1, {"actor/pg_loss": 0.1, "hindsight/targeted_tokens": 0.0, "hindsight/distill_loss": 0.2}),
      (2, {"actor/pg_loss": 0.2, "hindsight/targeted_tokens": 7.0, "hindsight/distill_loss": 0.1})], 0, ""),
    ([(1, {"actor/pg_loss": 0.1, "hindsight/targeted_tokens": 3.0, "hindsight/distill_loss": 0.2})], 0,
     "logged steps [1], expected up to 2"),
    ([(1, {"actor/pg_loss": 0.1, "hindsight/targeted_tokens": 0.0, "hindsight/distill_loss": 0.2}),
      (2, {"actor/pg_loss": 0.1, "hindsight/targeted_tokens": 0.0, "hindsight/distill_loss": 0.2})], 0,
     "hindsight/targeted_tokens never > 0: [0.0, 0.0]"),
    ([(1, {"actor/pg_loss": 0.1, "hindsight/targeted_tokens": 1.0, "hindsight/distill_loss": float("nan")}),
      (2, {"actor/pg_loss": 0.1, "hindsight/targeted_tokens": 1.0, "hindsight/distill_loss": 0.2})], 0,
     "hindsight/distill_loss not finite: [nan, 0.2]"),
    ([], 1, "exit 1: ValueError: hindsight.teacher.kind must be one of"),
])
def test_verdicts(tmp_path, rows, rc, expected):
    check = smoke.Check("hint_sd", "hint_sd", positive=("hindsight/targeted_tokens",),
                        finite=("actor/pg_loss", "hindsight/distill_loss"))
    _write_run(tmp_path, rows, log="starting\nValueError: hindsight.teacher.kind must be one of\nbye\n")
    assert smoke.judge(check, rc, tmp_path) == expected


def test_a_missing_teacher_checkpoint_fails_the_check(tmp_path):
    check = smoke.Check("hint_sd", "hint_sd", finite=(), teacher_checkpoint=True)
    _write_run(tmp_path, [(1, {}), (2, {})])
    assert "no teacher checkpoint" in smoke.judge(check, 0, tmp_path)
    (tmp_path / "ckpt" / "global_step_2" / "hindsight_teacher").mkdir(parents=True)
    (tmp_path / "ckpt" / "global_step_2" / "hindsight_teacher" / "teacher_rank0.pt").write_bytes(b"x")
    assert smoke.judge(check, 0, tmp_path) == ""
