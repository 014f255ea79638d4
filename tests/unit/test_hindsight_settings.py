"""The ``hindsight`` config block: misconfigurations fail with the key and the fix; the analyzer/reflector/error
feedback sources read what the agent loop recorded."""

import re

import pytest
from omegaconf import OmegaConf

from verl_hindsight.agent_loops.hindsight_answers import answer_metrics
from verl_hindsight.config import FeedbackConfig, TargetConfig, load_hindsight_config, lora_enabled
from verl_hindsight.hindsight.feedback import compute_feedback
from verl_hindsight.hindsight.records import Trajectory
from verl_hindsight.hindsight.stage import analyzer_picks_of
from verl_hindsight.hindsight.targets import select_targets


def _cfg(estimator="grpo", **hindsight):
    return OmegaConf.create({"algorithm": {"adv_estimator": estimator}, "hindsight": hindsight})


def test_serl_without_the_stage_is_an_error_naming_the_fix():
    with pytest.raises(ValueError, match="hindsight.enable=true"):
        load_hindsight_config(_cfg("serl"))


def test_topk_tail_with_verl_fused_kernels_is_refused():
    cfg = _cfg(enable=True, distill={"coef": 1.0, "divergence": "topk_tail", "topk": 4})
    cfg.actor_rollout_ref = {"model": {"use_fused_kernels": True}}
    with pytest.raises(ValueError, match=r"use_fused_kernels=true: the top-k \+ tail loss .* set use_fused_kernels="
                                         "false or divergence=k1, k3 or jsd"):
        load_hindsight_config(cfg)
    cfg.hindsight.distill.divergence = "k3"
    assert load_hindsight_config(cfg).distill.divergence == "k3"


def test_distillation_without_the_stage_and_a_stage_nothing_uses_are_errors():
    with pytest.raises(ValueError, match="hindsight.enable=true"):
        load_hindsight_config(_cfg(distill={"coef": 1.0}))
    with pytest.raises(ValueError, match="nothing uses the teacher"):
        load_hindsight_config(_cfg(enable=True))


def test_serl_with_the_top_k_teacher_is_refused():
    """SERL reads the teacher's log-prob of every sampled token; the top-k pass stores only the k best."""
    cfg = _cfg("serl", enable=True, distill={"coef": 1.0, "divergence": "topk_tail", "topk": 4})
    with pytest.raises(ValueError, match="divergence=k1, k3 or jsd with SERL"):
        load_hindsight_config(cfg)
    cfg.hindsight.distill.divergence = "k3"
    assert load_hindsight_config(cfg).distill.divergence == "k3"


def test_analyzer_sources_need_the_analyzer_role():
    with pytest.raises(ValueError, match="hindsight.analyzer.role=analyzer"):
        load_hindsight_config(_cfg(enable=True, distill={"coef": 1.0}, feedback={"source": "analyzer"}))
    with pytest.raises(ValueError, match="role=reflector"):
        load_hindsight_config(_cfg(enable=True, distill={"coef": 1.0}, feedback={"source": "reflection"}))
    with pytest.raises(ValueError, match="source=judge needs hindsight.analyzer.role=judge"):
        load_hindsight_config(_cfg(enable=True, distill={"coef": 1.0}, feedback={"source": "judge+immediate"}))
    for role, reader in (("analyzer", "add analyzer"), ("reflector", "add reflection"), ("judge", "add judge")):
        with pytest.raises(ValueError, match=f"role={role} asks a model .* nothing reads its answer: {reader}"):
            load_hindsight_config(_cfg(enable=True, distill={"coef": 1.0}, feedback={"source": "immediate"},
                                       analyzer={"role": role}))
    judged = load_hindsight_config(_cfg(enable=True, distill={"coef": 1.0}, feedback={"source": "judge"},
                                        analyzer={"role": "judge"}))
    assert judged.analyzer.failed_only is False  # the judge summarises successes too
    with pytest.raises(ValueError, match="hindsight.teacher.decay: Key .decay. not in"):
        load_hindsight_config(_cfg(enable=True, distill={"coef": 1.0}, teacher={"kind": "ema", "decay": 1}))
    with pytest.raises(ValueError, match="hindsight.teacher.kind"):
        load_hindsight_config(_cfg(enable=True, distill={"coef": 1.0}, teacher={"kind": "best"}))
    with pytest.raises(ValueError, match="hindsight.teacher.kl_anchor must be one of"):
        load_hindsight_config(_cfg(enable=True, distill={"coef": 1.0}, teacher={"kl_anchor": "policy"}))
    ok = load_hindsight_config(_cfg(enable=True, distill={"coef": 1.0}, feedback={"source": "analyzer"},
                                            targets={"turns": "analyzer_topk"}, analyzer={"role": "analyzer"}))
    assert ok.enable and ok.analyzer.role == "analyzer" and ok.teacher.kind == "frozen"
    assert ok.teacher.kl_anchor == "initial"  # a moving teacher never drags the KL anchor unless asked


def _turn(k, error=None):
    return {"turn": k, "response_span": [k * 10, k * 10 + 5], "has_action": True,
            "action": "A", "observation": "o", "feedback": error or "next", "error": error, "next_observation": "next"}


def _traj(extra, success=False):
    return Trajectory.from_extra_fields("u", {"hs_turns": [_turn(0), _turn(1, "wrong key"), _turn(2)],
                                              "hs_env": {"success": success}, **extra})


def test_analyzer_reflection_and_error_sources():
    analysis = {"steps": [[2, "use key D"], [7, "out of range turn"], [1, "  "]], "metrics": {}}
    reflection = {"turns": [{"turn": 0, "necessary": False, "valid": True, "diagnosis": "Detour.",
                             "corrected_action": "B"}, {"turn": 1, "necessary": True, "valid": False,
                                                         "diagnosis": ""}], "metrics": {}}
    trajs = [_traj({"hs_analysis": analysis}), _traj({"hs_reflection": reflection})]
    fb, _ = compute_feedback(trajs, FeedbackConfig(source="analyzer"))
    assert fb == {(0, 2): "use key D"}  # stray and empty steps dropped
    fb, _ = compute_feedback(trajs, FeedbackConfig(source="reflection"))
    assert fb == {(1, 0): "This step was unnecessary and valid. Detour. A better action: B"}
    fb, _ = compute_feedback(trajs, FeedbackConfig(source="error"))
    assert fb == {(0, 1): "wrong key", (1, 1): "wrong key"}
    picks = analyzer_picks_of(trajs)
    assert picks == {0: [2, 7, 1]}
    assert select_targets(trajs, fb, TargetConfig(turns="analyzer_topk", k=3), picks) == {0: [1, 2]}


def test_answer_metrics_count_each_episode_once():
    rows = [{"hs_last_row": False, "hs_analysis": {"metrics": {"hindsight/analyzer_calls": 1.0}}},
            {"hs_last_row": True, "hs_analysis": {"metrics": {"hindsight/analyzer_calls": 1.0,
                                                              "hindsight/analyzer_parse_failures": 1.0}}},
            {"hs_reflection": None},
            {"hs_judge": {"summary": None, "metrics": {"hindsight/judge_calls": 1.0,
                                                       "hindsight/judge_failure/schema": 1.0}}}]
    assert answer_metrics(rows) == {"hindsight/analyzer_calls": 1.0, "hindsight/analyzer_parse_failures": 1.0,
                                    "hindsight/judge_calls": 1.0, "hindsight/judge_failure/schema": 1.0}


def test_every_shipped_recipe_composes_and_validates():
    from hydra import compose, initialize_config_dir

    from verl_hindsight.launch import recipes_dir

    root = recipes_dir()
    recipes = [p for p in root.rglob("*.yaml")
               if not {"methods", "common", "toy_methods"} & set(p.relative_to(root).parts)
               and not p.stem.endswith(("_common", "_defaults"))]
    assert {"serl", "hint_sd", "hero", "grpo", "serl_lora", "hint_sd_lora"} <= {p.stem for p in recipes}
    for path in recipes:
        with initialize_config_dir(config_dir=str(path.parent), version_base=None):
            # hindsight.* without a `+`: every recipe includes hindsight_defaults.yaml
            cfg = compose(config_name=path.stem, overrides=["data.train_files=x", "data.val_files=y",
                                                            "hindsight.dump_rows=3"])
        settings = load_hindsight_config(cfg)
        assert settings.dump_rows == 3, path
        method = re.sub(r"^(pretrained_[a-z]+_|toy_)", "", path.stem).removesuffix("_lora")
        if method in ("serl", "hint_sd", "hero"):
            assert settings.enable, path
        # a LoRA recipe trains an adapter (so verl keeps the reference inside the actor); the others do not
        assert lora_enabled(cfg) == path.stem.endswith("_lora"), path
        assert (str(cfg.algorithm.adv_estimator) == "serl") == (method == "serl"), path


def test_stop_at_val_success_needs_a_fraction_and_validation():
    base = {"enable": True, "distill": {"coef": 1.0}}
    with pytest.raises(ValueError, match="stop_at_val_success must be in"):
        load_hindsight_config(_cfg(stop_at_val_success=80, **base))
    with pytest.raises(ValueError, match="trainer.test_freq > 0"):
        load_hindsight_config(_cfg(stop_at_val_success=0.8, **base))
    cfg = _cfg(stop_at_val_success=0.8, **base)
    cfg.trainer = {"test_freq": 10}
    assert load_hindsight_config(cfg).stop_at_val_success == 0.8


@pytest.mark.parametrize("step, success, total_after", [(30, 0.79, 100), (30, 0.8, 30), (1, 0.9, 1), (100, 1.0, 100)])
def test_stopping_makes_the_validated_step_the_last(step, success, total_after):
    """verl's loop runs while global_steps <= total_training_steps: lowering the total to the validated step ends
    training after it (the trainer method itself, on a stand-in for the trainer's state)."""
    from types import SimpleNamespace

    from verl_hindsight.trainer.hindsight_trainer import HindsightTrainer

    state = SimpleNamespace(hs=SimpleNamespace(stop_at_val_success=0.8), global_steps=step, total_training_steps=100)
    HindsightTrainer._maybe_stop(state, success)
    assert state.total_training_steps == total_after


def _strip_targets(block: dict) -> dict:
    return {k: _strip_targets(v) if isinstance(v, dict) else v for k, v in block.items() if k != "_target_"}


def test_defaults_yaml_equals_the_dataclass_defaults():
    from dataclasses import asdict

    from omegaconf import OmegaConf

    from verl_hindsight.config import HindsightConfig, SERLConfig
    from verl_hindsight.launch import recipes_dir

    shipped = OmegaConf.to_container(OmegaConf.load(recipes_dir() / "hindsight_defaults.yaml"))
    assert shipped["hindsight"] == _strip_targets(asdict(HindsightConfig()))
    assert shipped["algorithm"]["serl"] == _strip_targets(asdict(SERLConfig()))


def test_stock_verl_config_takes_double_plus_overrides():
    """The README's way to use the plugin on verl's own ppo_trainer config, without the defaults file."""
    from hydra import compose, initialize_config_module

    with initialize_config_module(config_module="verl.trainer.config", version_base=None):
        cfg = compose(config_name="ppo_trainer", overrides=["++hindsight.enable=true", "++hindsight.distill.coef=0.5",
                                                           "++hindsight.teacher.kind=ema"])
    settings = load_hindsight_config(cfg)
    assert (settings.enable, settings.distill.coef, settings.teacher.kind) == (True, 0.5, "ema")
    assert settings.targets.turns == "with_feedback"  # the rest of the block takes the defaults


def test_serl_base_estimator_must_broadcast_over_multi_row_episodes():
    cfg = _cfg("serl", enable=True, env={"history_turns": 2})
    cfg.algorithm.serl = {"base_estimator": "rloo"}
    with pytest.raises(ValueError, match="only for \\('grpo',\\)"):
        load_hindsight_config(cfg)
    cfg.algorithm.serl = {"base_estimator": "grpo"}
    assert load_hindsight_config(cfg).env.history_turns == 2


def _lora_cfg(model: dict, rollout: str = "vllm", kl: bool = True, **hindsight):
    cfg = _cfg(enable=True, distill={"coef": 1.0}, **hindsight)
    cfg.actor_rollout_ref = {"model": model, "rollout": {"name": rollout}, "actor": {"use_kl_loss": kl}}
    return cfg


@pytest.mark.parametrize("model, expected", [
    ({}, False), ({"lora_rank": 0}, False), ({"lora_rank": 8}, True), ({"lora": {"rank": 16}}, True),
    ({"lora": {"rank": 0}, "lora_rank": 4}, True), ({"lora_adapter_path": "/adapters/a"}, True)])
def test_lora_is_detected_by_verl_s_own_rule(model, expected):
    """verl keeps the reference inside the actor under LoRA (no ActorRolloutRef role although the run needs a
    reference); the plugin's rule must agree with verl's role choice, run here on the same config."""
    from types import SimpleNamespace

    from verl.trainer.ppo.utils import Role
    from verl.trainer.ppo.v1.trainer_base import PPOTrainer

    from verl_hindsight.config import lora_enabled

    from hydra import compose, initialize_config_module

    with initialize_config_module(config_module="verl.trainer.config", version_base=None):
        cfg = compose(config_name="ppo_trainer", overrides=["actor_rollout_ref.actor.use_kl_loss=true"])
    cfg.actor_rollout_ref.model.merge_with(model)
    state = SimpleNamespace(config=cfg)
    PPOTrainer._init_resource_pool_mgr(state)
    reference_in_actor = Role.ActorRollout in state.role_worker_mapping
    assert reference_in_actor == (Role.ActorRolloutRef not in state.role_worker_mapping)
    assert lora_enabled(cfg) is expected is reference_in_actor


def test_lora_settings_that_cannot_work_are_refused_with_the_fix():
    with pytest.raises(ValueError, match="kl_anchor=initial"):
        load_hindsight_config(_lora_cfg({"lora_rank": 8}, teacher={"kind": "ema", "kl_anchor": "teacher"}))
    with pytest.raises(ValueError, match="actor_rollout_ref.model.lora.merge=true"):
        load_hindsight_config(_lora_cfg({"lora_rank": 8}, rollout="hf"))
    # what does work: every teacher kind on its adapter, kl_anchor=teacher without a KL, hf with merged weights
    for kind in ("frozen", "ema", "lagged", "live"):
        load_hindsight_config(_lora_cfg({"lora_rank": 8, "lora": {"merge": True}}, rollout="hf", teacher={"kind": kind}))
    load_hindsight_config(_lora_cfg({"lora_rank": 8}, kl=False, teacher={"kind": "ema", "kl_anchor": "teacher"}))


@pytest.mark.parametrize("kind", ["frozen", "live", "ema", "lagged"])
@pytest.mark.parametrize("divergence", ["k1", "k3", "jsd", "topk_tail"])
def test_on_megatron_every_teacher_and_divergence_is_accepted_or_refused_naming_what_works(kind, divergence):
    cfg = _cfg(enable=True, distill={"coef": 1.0, "divergence": divergence}, teacher={"kind": kind})
    cfg.actor_rollout_ref = {"actor": {"strategy": "megatron"}}
    refused = [name for name, bad in ((f"hindsight.teacher.kind={kind}", kind in ("ema", "lagged")),
                                      ("hindsight.distill.divergence=topk_tail", divergence == "topk_tail")) if bad]
    if not refused:
        assert load_hindsight_config(cfg).teacher.kind == kind
        return
    with pytest.raises(ValueError) as err:
        load_hindsight_config(cfg)
    message = str(err.value)
    assert message.startswith(f"actor_rollout_ref.actor.strategy=megatron is not supported with {' and '.join(refused)}")
    assert "use hindsight.teacher.kind=frozen or live with hindsight.distill.divergence=k1, k3 or jsd" in message
    assert "\n" not in message
    cfg.actor_rollout_ref = {"actor": {"strategy": "fsdp2"}}
    assert load_hindsight_config(cfg).distill.divergence == divergence  # the same settings on FSDP


def test_the_no_feedback_control_refuses_settings_it_would_ignore():
    cfg = _cfg(enable=True, distill={"coef": 1.0}, teacher={"insert_feedback": False})
    assert load_hindsight_config(cfg).teacher.insert_feedback is False
    with pytest.raises(ValueError, match="hindsight.teacher.insert_at=episode_start places feedback that "
                                         "hindsight.teacher.insert_feedback=false leaves out"):
        load_hindsight_config(_cfg(enable=True, distill={"coef": 1.0},
                                   teacher={"insert_feedback": False, "insert_at": "episode_start"}))
    with pytest.raises(ValueError, match="insert_feedback=false with kind=live: .* use kind=frozen"):
        load_hindsight_config(_cfg(enable=True, distill={"coef": 1.0},
                                   teacher={"insert_feedback": False, "kind": "live"}))


def test_hero_on_the_toy_uses_the_environment_as_its_reflector():
    """recipes/cpu/toy_hero_env.yaml: HERO's method block with the environment's error message as the diagnosis."""
    from hydra import compose, initialize_config_dir

    from verl_hindsight.launch import recipes_dir

    with initialize_config_dir(config_dir=str(recipes_dir() / "cpu"), version_base=None):
        cfg = compose(config_name="toy_hero_env", overrides=["data.train_files=x", "data.val_files=y"])
    settings = load_hindsight_config(cfg)
    assert settings.feedback.source == "error" and settings.analyzer.role == "none"
    assert (settings.targets.turns, settings.targets.trajectories) == ("with_feedback", "all")
    assert (settings.teacher.kind, settings.distill.divergence, settings.distill.jsd_beta) == ("frozen", "jsd", 0.5)
    assert settings.distill.coef == 1.0 and settings.distill.policy_gradient
    assert str(cfg.algorithm.adv_estimator) == "grpo"
