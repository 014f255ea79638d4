"""Which runs ``verl-hindsight demo`` plans for a seed (``--methods``, ``--ablations``) and how it schedules them
(``--jobs``)."""

import threading
import time
from pathlib import Path

import pytest

from verl_hindsight.cli import main
from verl_hindsight.demo.run import ABLATIONS, COMPARISON, DemoConfig, planned_runs, recipe_for, run_all


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


class RecordingRunner:
    """Stands in for main_ppo (a subprocess of minutes) to observe the scheduler: when each run starts and ends, on
    which progress-bar line, with which recipe."""

    def __init__(self, fail: str = ""):
        self.lock = threading.Lock()
        self.active = 0
        self.peak = 0
        self.calls = []
        self.fail = fail

    def __call__(self, recipe, overrides, out, steps, label, position):
        with self.lock:
            self.active += 1
            self.peak = max(self.peak, self.active)
            start = time.monotonic()
        time.sleep(0.05)
        with self.lock:
            self.active -= 1
            self.calls.append((label, recipe, position, start, time.monotonic(), out.is_dir()))
        return 1 if label == self.fail else 0


@pytest.mark.parametrize("jobs", [1, 2, 3])
def test_runs_go_at_most_jobs_at_a_time_each_on_its_own_line(tmp_path, jobs):
    cfg = DemoConfig(run_dir=tmp_path, seeds=2, jobs=jobs)
    runner = RecordingRunner(fail="serl seed 1")
    failures = run_all(cfg, planned_runs(cfg), Path("model"), Path("train"), Path("val"), runner=runner)
    assert failures == ["serl-s1"]
    assert runner.peak == jobs
    labels = sorted(c[0] for c in runner.calls)
    assert labels == sorted(f"{m} seed {s}" for s in (0, 1) for m in ("grpo", "hint_sd", "serl"))
    assert all(c[5] for c in runner.calls)  # the run folder exists before main_ppo starts
    assert {c[2] for c in runner.calls} == set(range(jobs))
    for a in runner.calls:  # two runs that overlap in time never share a progress-bar line
        for b in runner.calls:
            if a is not b and a[3] < b[4] and b[3] < a[4]:
                assert a[2] != b[2], (a, b)


def test_first_seed_shifts_the_seeds_and_their_folders(tmp_path):
    cfg = DemoConfig(run_dir=tmp_path, seeds=2, first_seed=1, methods=("rlsd_clipped",), jobs=1)
    runner = RecordingRunner()
    assert run_all(cfg, planned_runs(cfg), Path("model"), Path("train"), Path("val"), runner=runner) == []
    assert [c[0] for c in runner.calls] == ["rlsd_clipped seed 1", "rlsd_clipped seed 2"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rlsd_clipped-s1", "rlsd_clipped-s2"]


def test_a_run_already_made_in_the_folder_is_refused_before_anything_runs(tmp_path):
    (tmp_path / "grpo-s1").mkdir()
    (tmp_path / "grpo-s1" / "metrics.jsonl").write_text("{}\n")
    (tmp_path / "hint_sd-s1").mkdir()  # a folder without metrics (a run that never started) is reused
    with pytest.raises(SystemExit, match=r"already holds runs \['grpo-s1'\]; remove those folders"):
        main(["demo", "--run-dir", str(tmp_path), "--methods", "grpo,hint_sd", "--seeds", "2"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["grpo-s1", "hint_sd-s1"]
    assert _names(methods=("grpo",), seeds=1) == ["grpo"]  # seed 0 only: seed 1's folder is not in the way
    assert [n for n, _ in planned_runs(DemoConfig(run_dir=tmp_path, methods=("grpo",), first_seed=2))] == ["grpo"]


def test_ablations_run_the_hint_sd_recipe(tmp_path):
    cfg = DemoConfig(run_dir=tmp_path, methods=("hint_sd_live", "serl"), jobs=1)
    runner = RecordingRunner()
    assert run_all(cfg, planned_runs(cfg), Path("model"), Path("train"), Path("val"), runner=runner) == []
    assert [(c[0], c[1]) for c in runner.calls] == [("hint_sd_live seed 0", "cpu/toy_hint_sd"),
                                                   ("serl seed 0", "cpu/toy_serl")]


@pytest.mark.parametrize("flag, value", [("--jobs", 0), ("--batch-tasks", 0), ("--first-seed", -1)])
def test_a_count_below_one_is_refused_before_anything_runs(tmp_path, flag, value):
    with pytest.raises(ValueError, match=rf"{flag} {value}: "):
        DemoConfig(run_dir=tmp_path, **{flag[2:].replace("-", "_"): value})
    with pytest.raises(SystemExit, match=rf"{flag} {value}: "):
        main(["demo", flag, str(value), "--run-dir", str(tmp_path / "demo")])
    assert not (tmp_path / "demo").exists()


def test_lora_runs_each_method_s_lora_recipe_and_every_one_exists(tmp_path):
    from verl_hindsight.launch import recipes_dir

    cfg = DemoConfig(run_dir=tmp_path, methods=("grpo", "hint_sd", "serl", "hint_sd_ema"), jobs=1, lora=True)
    runner = RecordingRunner()
    assert run_all(cfg, planned_runs(cfg), Path("model"), Path("train"), Path("val"), runner=runner) == []
    recipes = [c[1] for c in runner.calls]
    assert recipes == ["cpu/toy_grpo_lora", "cpu/toy_hint_sd_lora", "cpu/toy_serl_lora", "cpu/toy_hint_sd_lora"]
    assert all((recipes_dir() / f"{r}.yaml").is_file() for r in recipes)


def test_comparison_runs_are_named_alone_with_their_overrides_and_not_added_by_ablations():
    runs = dict(planned_runs(DemoConfig(run_dir=Path("unused"), methods=("rlsd", "hint_sd_nofb", "serl_clip1"))))
    assert runs == {
        "rlsd": ["hindsight.teacher.kind=frozen", "algorithm.serl.mixing_lambda=1.0",
                 "algorithm.serl.lambda_decay_steps=null", "algorithm.serl.credit_rule=rlsd"],
        "hint_sd_nofb": ["hindsight.teacher.insert_feedback=false"],
        "serl_clip1": ["algorithm.serl.weight_clip=1.0"]}
    assert not set(COMPARISON) & set(_names(methods=("grpo",), ablations=True))


@pytest.mark.parametrize("name, recipe", [
    ("grpo", "cpu/toy_grpo"), ("serl", "cpu/toy_serl"), ("hint_sd_live", "cpu/toy_hint_sd"),
    ("hint_sd_nofb", "cpu/toy_hint_sd"), ("rlsd", "cpu/toy_serl"), ("rlsd_clipped", "cpu/toy_serl"),
    ("additive_nofb", "cpu/toy_serl"), ("rlsd_clipped_nofb", "cpu/toy_serl"), ("serl_nodecay", "cpu/toy_serl"), ("hero", "cpu/toy_hero_env")])
def test_recipe_comes_from_the_run_name_s_method(name, recipe):
    assert recipe_for(name) == recipe


def test_every_comparison_run_composes_on_its_recipe_and_sets_what_it_names():
    """Each run's recipe with its overrides, composed by hydra and loaded as the trainer loads it."""
    from hydra import compose, initialize_config_dir

    from verl_hindsight.config import load_hindsight_config, load_serl_config
    from verl_hindsight.launch import recipes_dir

    loaded = {}
    for name, overrides in COMPARISON.items():
        recipe = recipes_dir() / f"{recipe_for(name)}.yaml"
        with initialize_config_dir(config_dir=str(recipe.parent), version_base=None):
            cfg = compose(config_name=recipe.stem, overrides=["data.train_files=x", "data.val_files=y", *overrides])
        loaded[name] = (load_hindsight_config(cfg), load_serl_config(cfg.algorithm), str(cfg.algorithm.adv_estimator))
    for name in ("rlsd", "rlsd_clipped", "additive", "rlsd_nofb", "rlsd_clipped_nofb", "additive_nofb"):
        hs, serl, estimator = loaded[name]
        assert estimator == "serl" and hs.teacher.kind == "frozen"
        assert serl.mixing(0) == serl.mixing(10**6) == 1.0  # full strength, no decay
        rule = name.removesuffix("_nofb")
        assert serl.credit_rule == {"rlsd_clipped": "serl"}.get(rule, rule)
        assert hs.teacher.insert_feedback == (not name.endswith("_nofb"))
    assert loaded["serl_clip1"][1].weight_clip == 1.0 and loaded["serl_clip1"][0].teacher.kind == "lagged"
    assert loaded["serl_nodecay"][1].mixing(10**6) == 0.5
    hs, _, estimator = loaded["hint_sd_nofb"]
    assert not hs.teacher.insert_feedback and hs.distill.divergence == "topk_tail" and estimator == "grpo"
    hs, _, estimator = loaded["hero"]
    assert (hs.feedback.source, hs.analyzer.role, hs.distill.divergence, estimator) == ("error", "none", "jsd", "grpo")


def test_a_run_without_a_lora_recipe_is_refused_under_lora():
    with pytest.raises(ValueError, match=r"--lora: no LoRA recipe for \['hero'\]; drop --lora or those runs"):
        planned_runs(DemoConfig(run_dir=Path("unused"), methods=("serl", "hero"), lora=True))
    names = [n for n, _ in planned_runs(DemoConfig(run_dir=Path("unused"), methods=("rlsd", "hint_sd_nofb"),
                                                   lora=True))]
    assert [recipe_for(n, lora=True) for n in names] == ["cpu/toy_serl_lora", "cpu/toy_hint_sd_lora"]
