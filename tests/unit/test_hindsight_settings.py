"""The ``hindsight`` config block: misconfigurations fail with the key and the fix; the analyzer/reflector/error
feedback sources read what the agent loop recorded."""

import pytest
from omegaconf import OmegaConf

from verl_hindsight.agent_loops.hindsight_answers import answer_metrics
from verl_hindsight.hindsight.feedback import FeedbackConfig, compute_feedback
from verl_hindsight.hindsight.records import Trajectory
from verl_hindsight.hindsight.stage import HindsightSettings, analyzer_picks_of
from verl_hindsight.hindsight.targets import TargetConfig, select_targets


def _cfg(estimator="grpo", **hindsight):
    return OmegaConf.create({"algorithm": {"adv_estimator": estimator}, "hindsight": hindsight})


def test_serl_without_the_stage_is_an_error_naming_the_fix():
    with pytest.raises(ValueError, match="hindsight.enable=true"):
        HindsightSettings.from_config(_cfg("serl"))


def test_distillation_without_the_stage_and_a_stage_nothing_uses_are_errors():
    with pytest.raises(ValueError, match="hindsight.enable=true"):
        HindsightSettings.from_config(_cfg(distill={"coef": 1.0}))
    with pytest.raises(ValueError, match="nothing uses the teacher"):
        HindsightSettings.from_config(_cfg(enable=True))


def test_analyzer_sources_need_the_analyzer_role():
    with pytest.raises(ValueError, match="hindsight.analyzer.role=analyzer"):
        HindsightSettings.from_config(_cfg(enable=True, distill={"coef": 1.0}, feedback={"source": "analyzer"}))
    with pytest.raises(ValueError, match="role=reflector"):
        HindsightSettings.from_config(_cfg(enable=True, distill={"coef": 1.0}, feedback={"source": "reflection"}))
    with pytest.raises(ValueError, match="unknown keys"):
        HindsightSettings.from_config(_cfg(enable=True, distill={"coef": 1.0}, teacher={"kind": "ema", "decay": 1}))
    with pytest.raises(ValueError, match="hindsight.teacher.kind"):
        HindsightSettings.from_config(_cfg(enable=True, distill={"coef": 1.0}, teacher={"kind": "best"}))
    with pytest.raises(ValueError, match="hindsight.teacher.kl_anchor must be initial or teacher"):
        HindsightSettings.from_config(_cfg(enable=True, distill={"coef": 1.0}, teacher={"kl_anchor": "policy"}))
    ok = HindsightSettings.from_config(_cfg(enable=True, distill={"coef": 1.0}, feedback={"source": "analyzer"},
                                            targets={"turns": "analyzer_topk"}, analyzer={"role": "analyzer"}))
    assert ok.enable and ok.analyzer_role == "analyzer" and ok.teacher.kind == "frozen"
    assert ok.teacher.kl_anchor == "initial"  # a moving teacher never drags the KL anchor unless asked


def _turn(k, error=None):
    return {"turn": k, "response_span": [k * 10, k * 10 + 5], "action_span": [k * 10 + 1, k * 10 + 2],
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
            {"hs_reflection": None}]
    assert answer_metrics(rows) == {"hindsight/analyzer_calls": 1.0, "hindsight/analyzer_parse_failures": 1.0}


def test_every_shipped_recipe_composes_and_validates():
    from hydra import compose, initialize_config_dir

    from verl_hindsight.launch import recipes_dir

    root = recipes_dir()
    recipes = [p for p in root.rglob("*.yaml")
               if p.parent.name not in ("methods", "common") and not p.stem.endswith("_common")]
    assert {"serl", "hint_sd", "hero", "grpo"} <= {p.stem for p in recipes}
    for path in recipes:
        with initialize_config_dir(config_dir=str(path.parent), version_base=None):
            cfg = compose(config_name=path.stem, overrides=["data.train_files=x", "data.val_files=y"])
        settings = HindsightSettings.from_config(cfg)
        method = path.stem.removeprefix("toy_")
        if method in ("serl", "hint_sd", "hero"):
            assert settings.enable, path
        assert (str(cfg.algorithm.adv_estimator) == "serl") == (method == "serl"), path


def test_stop_at_val_success_needs_a_fraction_and_validation():
    base = {"enable": True, "distill": {"coef": 1.0}}
    with pytest.raises(ValueError, match="stop_at_val_success must be in"):
        HindsightSettings.from_config(_cfg(stop_at_val_success=80, **base))
    with pytest.raises(ValueError, match="trainer.test_freq > 0"):
        HindsightSettings.from_config(_cfg(stop_at_val_success=0.8, **base))
    cfg = _cfg(stop_at_val_success=0.8, **base)
    cfg.trainer = {"test_freq": 10}
    assert HindsightSettings.from_config(cfg).stop_at_val_success == 0.8


@pytest.mark.parametrize("step, success, total_after", [(30, 0.79, 100), (30, 0.8, 30), (1, 0.9, 1), (100, 1.0, 100)])
def test_stopping_makes_the_validated_step_the_last(step, success, total_after):
    """verl's loop runs while global_steps <= total_training_steps: lowering the total to the validated step ends
    training after it (the trainer method itself, on a stand-in for the trainer's state)."""
    from types import SimpleNamespace

    from verl_hindsight.trainer.hindsight_trainer import HindsightTrainer

    state = SimpleNamespace(hs=SimpleNamespace(stop_at_val_success=0.8), global_steps=step, total_training_steps=100)
    HindsightTrainer._maybe_stop(state, success)
    assert state.total_training_steps == total_after
