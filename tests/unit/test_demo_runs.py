"""Which runs ``verl-hindsight demo`` plans for a seed (``--methods``, ``--ablations``)."""

from pathlib import Path

import pytest

from verl_hindsight.demo.run import ABLATIONS, DemoConfig, planned_runs


def _names(**kwargs):
    return [name for name, _ in planned_runs(DemoConfig(run_dir=Path("unused"), **kwargs))]


def test_default_is_the_three_methods_without_extra_overrides():
    cfg = DemoConfig(run_dir=Path("unused"))
    assert planned_runs(cfg) == [("grpo", []), ("hint_sd", []), ("serl", [])]


def test_ablations_follow_the_methods_and_carry_their_overrides():
    runs = dict(planned_runs(DemoConfig(run_dir=Path("unused"), methods=("hint_sd",), ablations=True)))
    assert list(runs) == ["hint_sd", "hint_sd_ema", "hint_sd_lagged", "hint_sd_live", "hint_sd_episode_start"]
    assert runs["hint_sd_live"] == ["hindsight.teacher.kind=live"]


def test_an_ablation_can_be_named_alone_and_is_not_repeated():
    assert _names(methods=("hint_sd_live",)) == ["hint_sd_live"]
    assert _names(methods=("hint_sd_live", "grpo"), ablations=True) == ["hint_sd_live", "grpo"] + [
        a for a in ABLATIONS if a != "hint_sd_live"]


def test_an_unknown_run_is_named_in_the_error():
    with pytest.raises(ValueError, match=r"unknown demo runs \['hero_live'\]; choose from grpo, hint_sd, serl, "):
        _names(methods=("hero_live",))
