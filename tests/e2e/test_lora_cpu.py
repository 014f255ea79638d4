"""LoRA teachers through stock ``main_ppo`` on CPU: the frozen teacher is the base with the adapter off, EMA and
lagged teachers are a second adapter (toy environment, tiny format-warm-started model)."""

import math

import pytest
import torch

from verl_hindsight.environment.data import write_env_dataset

from conftest_e2e import base_model_probe, probe_gap_per_token, run_recipe

pytestmark = pytest.mark.e2e



@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_env_dataset("toy", tmp_path_factory.mktemp("toy_data"), max_train=16, max_val=4)


def _base(format_model, data, run_dir, steps):
    train, val = data
    return [f"actor_rollout_ref.model.path={format_model}", f"data.train_files={train}", f"data.val_files={val}",
            f"trainer.total_training_steps={steps}", f"trainer.default_local_dir={run_dir / 'ckpt'}",
            "hindsight.teacher.log_probe=true"]


def _tensors(path) -> dict[str, torch.Tensor]:
    state = torch.load(path, map_location="cpu", weights_only=False)
    return {k: (v.to_local() if hasattr(v, "to_local") else v).float() for k, v in state.items()}


def _adapter(step_dir) -> dict[str, torch.Tensor]:
    """The trained adapter of verl's actor checkpoint (one rank), by parameter name."""
    return {k: v for k, v in _tensors(step_dir / "actor" / "model_world_size_1_rank_0.pt").items() if ".lora_" in k}


def _teacher(step_dir) -> dict[str, torch.Tensor]:
    return _tensors(step_dir / "hindsight_teacher" / "teacher_rank0.pt")


def test_hint_sd_with_an_ema_adapter_teacher(format_model, data, tmp_path):
    decay = 0.5  # large steps, so that a wrong mix or a missed update shows
    rows = run_recipe("cpu/toy_hint_sd_lora", tmp_path, _base(format_model, data, tmp_path, 3) + [
        "hindsight.teacher.kind=ema", f"hindsight.teacher.ema_decay={decay}", "trainer.save_freq=1",
        "algorithm.rollout_correction.bypass_mode=false"])
    assert len(rows) == 3
    for m in rows:
        for key in ("actor/pg_loss", "actor/hindsight/distill_loss", "hindsight/teacher_update_mean_abs"):
            assert math.isfinite(m[key]), (key, m)
        # the hf rollout serves the merged trained adapter: its log-probs are the trainer's (the teacher's adapter,
        # swapped in for the teacher pass only, never reaches it)
        assert abs(m["rollout_corr/log_ppl_diff"]) < 1e-3
        assert m["hindsight/teacher_update_mean_abs"] > 0
    ckpt = tmp_path / "ckpt"
    actor = {k: _adapter(ckpt / f"global_step_{k}") for k in (1, 2, 3)}
    teacher = {k: _teacher(ckpt / f"global_step_{k}") for k in (1, 2, 3)}
    assert set(teacher[1]) == set(actor[1]) and teacher[1], "the teacher is exactly the adapter's tensors"
    # teacher_k = decay * teacher_(k-1) + (1 - decay) * adapter_k, from the saved history of the trained adapter
    for k in (2, 3):
        for name, value in teacher[k].items():
            expected = decay * teacher[k - 1][name] + (1 - decay) * actor[k][name]
            assert torch.allclose(value, expected, atol=1e-6, rtol=0), (k, name)
    # and teacher_0 was the adapter at initialisation (peft's lora_B starts at zero)
    for name in teacher[1]:
        if ".lora_B." in name:
            initial = (teacher[1][name] - (1 - decay) * actor[1][name]) / decay
            assert initial.abs().max() < 1e-6, name
    # the teacher state is the adapter's bytes (fp32 here), not a copy of the model
    adapter_bytes = sum(v.numel() * 4 for v in teacher[1].values())
    assert all(m["hindsight/teacher_state_bytes"] == adapter_bytes for m in rows)
    model_bytes = sum(v.numel() * 4 for k, v in _tensors(ckpt / "global_step_1" / "actor" /
                                                           "model_world_size_1_rank_0.pt").items())
    assert adapter_bytes < model_bytes / 5
    # the teacher moves; the KL anchor (the base with the adapter off) does not, and it is the base model
    assert rows[2]["hindsight/teacher_probe_logprob"] != rows[0]["hindsight/teacher_probe_logprob"]
    base = base_model_probe(format_model)
    for m in rows:
        assert probe_gap_per_token(m["hindsight/reference_probe_logprob"], base) < 1e-5


def test_frozen_teacher_under_lora_is_the_base_model(format_model, data, tmp_path):
    rows = run_recipe("cpu/toy_hint_sd_lora", tmp_path, _base(format_model, data, tmp_path, 2))
    assert not any("hindsight/teacher_state_bytes" in m for m in rows)  # no weights of its own
    base = base_model_probe(format_model)
    # after an update the adapter is non-zero, yet the frozen teacher scores exactly as the base model
    assert rows[0]["actor/grad_norm"] > 0
    for m in rows:
        assert probe_gap_per_token(m["hindsight/teacher_probe_logprob"], base) < 1e-5
        assert m["actor/hindsight/distill_loss"] >= 0


def test_serl_lagged_adapter_teacher_resumes_as_if_uninterrupted(format_model, data, tmp_path):
    lagged = ["hindsight.teacher.sync_interval=2", "trainer.save_freq=1"]
    full_dir = tmp_path / "full"
    full_dir.mkdir()
    full = run_recipe("cpu/toy_serl_lora", full_dir, _base(format_model, data, full_dir, 3) + lagged)
    assert [m.get("hindsight/teacher_update_mean_abs", 0.0) > 0 for m in full] == [False, True, False]
    # the lagged teacher is the adapter of step 2 from step 3 on, and before that the initial adapter
    ckpt = full_dir / "ckpt"
    for name, value in _teacher(ckpt / "global_step_2").items():
        assert torch.equal(value, _adapter(ckpt / "global_step_2")[name]), name
    assert full[0]["hindsight/teacher_probe_logprob"] == full[1]["hindsight/teacher_probe_logprob"]
    assert full[2]["hindsight/teacher_probe_logprob"] != full[1]["hindsight/teacher_probe_logprob"]
    for m in full:
        assert m["serl/changed_tokens_outside_hindsight_mask"] == 0.0
        assert 0.8 - 1e-6 <= m["serl/weight_mean"] <= 1.2 + 1e-6
    resumed_dir = tmp_path / "resumed"
    resumed_dir.mkdir()
    resumed = run_recipe("cpu/toy_serl_lora", resumed_dir, _base(format_model, data, resumed_dir, 3) + lagged + [
        "trainer.resume_mode=resume_path", f"trainer.resume_from_path={ckpt / 'global_step_2'}"])
    assert len(resumed) == 1  # only step 3 ran
    assert resumed[0]["hindsight/teacher_probe_logprob"] == pytest.approx(
        full[2]["hindsight/teacher_probe_logprob"], abs=1e-5)
    assert resumed[0]["hindsight/reference_probe_logprob"] == pytest.approx(
        full[2]["hindsight/reference_probe_logprob"], abs=1e-5)
