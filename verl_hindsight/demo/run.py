"""``verl-hindsight demo``: GRPO, HINT-SD and SERL trained side by side on the toy corridor, on CPU, through stock
``python -m verl.trainer.main_ppo`` with the project's recipes.

Phases (each with a progress bar; verl's own logs go to ``<run>/verl.log`` files):
1. build the tiny model offline, then one supervised warm start shared by every method and seed: the output format
   and following a hint placed in context, with random hint contents (:mod:`.warm_start`);
2. for each seed and method: ``recipes/cpu/toy_<method>.yaml`` from the warm start, validation every
   ``--test-freq`` steps, per-step metrics and trajectory dumps in ``<run_dir>/<method>-s<seed>/``;
3. ``curves.png`` (validation success, teacher-student gap, share of response tokens distilled/reweighted),
   ``viewer.html`` (trajectories with the inserted feedback and per-token values), ``summary.txt``.

``--ablations`` adds HINT-SD runs with the other teacher kinds (EMA, lagged, live) and with the feedback inserted at
the start of the episode instead of at the failing turn. ``--methods`` also takes the runs of :data:`COMPARISON`
(signed credit rules, SERL ablations, no-feedback controls, HERO with the environment as its reflector;
docs/methods.md).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

METHODS = ("grpo", "hint_sd", "serl")
# The demo's model. Hidden 128 / 4 layers: the default tiny model (hidden 64, 2 layers) does not learn to copy a
# key from a hint in the warm start. 8 heads of 16 dims: 4 heads of 32 learn hint following but leave the key
# position colour-blind, so the hidden rule is then slow to learn. Untied input and output embeddings: tied, the
# warm start's uniform targets on un-hinted doors pull the key letters' embeddings together and the teacher cannot
# tell one hinted key from another. The runs behind each choice: docs/demo.md ("Model shape: 8 heads of 16 dims",
# "Why C and E merge: tied embeddings").
DEMO_MODEL = {"hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 4, "num_attention_heads": 8,
              "num_key_value_heads": 8, "tie_word_embeddings": False}
WARM_START = {"lr": 1e-3, "hint_prob": 0.75}
ABLATIONS = {
    "hint_sd_ema": ["hindsight.teacher.kind=ema", "hindsight.teacher.ema_decay=0.99"],
    "hint_sd_lagged": ["hindsight.teacher.kind=lagged", "hindsight.teacher.sync_interval=10"],
    "hint_sd_live": ["hindsight.teacher.kind=live"],
    "hint_sd_episode_start": ["hindsight.teacher.insert_at=episode_start"],
}
# The signed credit rules run the SERL recipe with HINT-SD's teacher (the frozen warm start: lagged, EMA and live
# teachers lose their gap on the toy, docs/demo.md) and the rule at full strength, without decay: RLSD and OPID
# apply their credit on every update, and SERL's decay would make every rule plain GRPO after 50 of 200 steps.
SIGNED = ["hindsight.teacher.kind=frozen", "algorithm.serl.mixing_lambda=1.0", "algorithm.serl.lambda_decay_steps=null"]
NO_FEEDBACK = "hindsight.teacher.insert_feedback=false"
# Issue 23's comparison; ``--methods`` only (``--ablations`` keeps adding the HINT-SD teacher ablations alone)
COMPARISON = {
    "rlsd": SIGNED + ["algorithm.serl.credit_rule=rlsd"],
    "rlsd_clipped": SIGNED,  # credit_rule=serl at lambda 1: RLSD's clipped weight as implementations restate it
    "additive": SIGNED + ["algorithm.serl.credit_rule=additive", "algorithm.serl.additive_beta=1.0"],
    "rlsd_nofb": SIGNED + ["algorithm.serl.credit_rule=rlsd", NO_FEEDBACK],
    "rlsd_clipped_nofb": SIGNED + [NO_FEEDBACK],
    "additive_nofb": SIGNED + ["algorithm.serl.credit_rule=additive", "algorithm.serl.additive_beta=1.0",
                               NO_FEEDBACK],
    "hint_sd_nofb": [NO_FEEDBACK],
    "serl_clip1": ["algorithm.serl.weight_clip=1.0"],
    "serl_nodecay": ["algorithm.serl.lambda_decay_steps=null"],
    "hero": [],  # recipes/cpu/toy_hero_env.yaml: the environment's error message is the reflector's diagnosis
}
# run-name prefix -> recipe (cpu/toy_<recipe>.yaml); the longest matching prefix wins
RECIPES = {"grpo": "grpo", "hint_sd": "hint_sd", "serl": "serl", "rlsd": "serl", "additive": "serl",
           "hero": "hero_env"}


@dataclass(frozen=True)
class DemoConfig:
    run_dir: Path
    seeds: int = 1
    first_seed: int = 0  # seeds first_seed .. first_seed + seeds - 1: more seeds of runs made earlier
    steps: int = 200  # the budget: a run that has not reached stop_at counts at it in the summary
    test_freq: int = 10
    warm_steps: int = 400
    methods: tuple[str, ...] = METHODS
    ablations: bool = False
    stop_at: Optional[float] = 0.8  # end a run at its first validation success >= this (None: run every step)
    overrides: tuple[str, ...] = ()  # extra hydra overrides for every run (``--override``)
    # tasks per step (x rollouts episodes). The comparison with GRPO is made at 8: fewer tasks make a step shorter,
    # but HINT-SD then needs more steps to reach stop_at (docs/demo.md, "Toward the issue's ~15 minutes")
    batch_tasks: int = 8
    rollouts: int = 4
    warm_model: Optional[Path] = None  # reuse a warm start (e.g. of an earlier demo run) instead of training one
    lora: bool = False  # train a LoRA adapter (recipes/cpu/toy_*_lora.yaml) instead of every weight
    # runs at once. One CPU run leaves part of two cores idle (Ray and the agent loop wait on each other), so two
    # side by side finish sooner than one after the other; three oversubscribe two cores and gain nothing
    # (benchmarks/demo_wall_time.py measures it; figures in docs/demo.md). Each run is its own main_ppo process
    # and Ray instance, so memory grows with jobs.
    jobs: int = 2

    @classmethod
    def quick(cls, run_dir: Path) -> "DemoConfig":
        # 80 warm-start steps: enough for the output format, so the failing turns carry actions to target
        return cls(run_dir=run_dir, seeds=1, steps=2, test_freq=1, warm_steps=80, batch_tasks=2, rollouts=2,
                   stop_at=None)

    def __post_init__(self) -> None:
        if self.jobs < 1:
            raise ValueError(f"--jobs {self.jobs}: train at least one run at a time (--jobs 1 runs them one after "
                             "the other)")
        if self.batch_tasks < 1:
            raise ValueError(f"--batch-tasks {self.batch_tasks}: a step needs at least one task")
        if self.first_seed < 0:
            raise ValueError(f"--first-seed {self.first_seed}: seeds start at 0")

    @property
    def seed_range(self) -> range:
        return range(self.first_seed, self.first_seed + self.seeds)


def run_overrides(cfg: DemoConfig, model: Path, train: Path, val: Path, seed: int, out: Path) -> list[str]:
    # verl asserts that micro-batches divide each rank's rows (rollouts per step, and the validation panel)
    micro = math.gcd(4, cfg.batch_tasks * cfg.rollouts)
    return [
        f"actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu={micro}",
        f"actor_rollout_ref.ref.log_prob_micro_batch_size_per_gpu={micro}",
        f"actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu={micro}",
        f"actor_rollout_ref.model.path={model}", f"data.train_files={train}", f"data.val_files={val}",
        f"data.seed={seed}", f"actor_rollout_ref.rollout.seed={seed}",
        f"data.train_batch_size={cfg.batch_tasks}", f"actor_rollout_ref.rollout.n={cfg.rollouts}",
        f"actor_rollout_ref.actor.ppo_mini_batch_size={cfg.batch_tasks}",
        f"trainer.test_freq={cfg.test_freq}", "trainer.val_before_train=true",
        f"hindsight.dump_dir={out / 'dump'}", "hindsight.dump_rows=8",
        # policy gradient on action tokens only: on every token, GRPO at this learning rate drives the tiny model
        # out of its <action> format (docs/demo.md, "History: measurements before the budget fix")
        "hindsight.advantage_tokens=actions",
        f"hindsight.stop_at_val_success={'null' if cfg.stop_at is None else cfg.stop_at}",
    ]


def run_demo(cfg: DemoConfig) -> int:
    from tqdm import tqdm

    from verl_hindsight.demo.warm_start import hint_following, warm_start
    from verl_hindsight.environment.data import write_env_dataset
    from verl_hindsight.tiny_model import make_tiny_model

    runs = planned_runs(cfg)  # an unknown run name or a finished run fails here, before the warm start
    run_dir = cfg.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    print(f"run folder: {run_dir}")
    if cfg.warm_model is not None:
        model = Path(cfg.warm_model).resolve()
        losses = [None]
        print(f"warm start: reusing {model}")
    else:
        tiny = make_tiny_model(run_dir / "tiny_model", seed=0, **DEMO_MODEL)
        with tqdm(total=cfg.warm_steps, desc="warm start (format + hint following)", unit="step") as bar:
            losses: list[float] = []

            def progress(loss: float) -> None:
                losses.append(loss)
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.3f}")

            model = Path(warm_start(tiny, run_dir / "warm_model", steps=cfg.warm_steps, progress=progress,
                                    **WARM_START))
    probe = hint_following(model, n=64)
    (run_dir / "warm_start.json").write_text(json.dumps({"steps": cfg.warm_steps, "final_loss": losses[-1],
                                                         "model": DEMO_MODEL, **WARM_START, **probe}, indent=2))
    print(f"warm start: P(hinted key | hint) = {probe['p_hinted_key']:.2f}, hinted key top-1 "
          f"{probe['hinted_key_top1']:.2f}; hidden rule top-1 without a hint {probe['rule_top1_without_hint']:.2f} "
          "(chance 0.17)")
    train, val = write_env_dataset("toy", run_dir / "data", max_val=64)  # a fixed 64-task validation panel

    failures = run_all(cfg, runs, model, train, val)
    return finish(cfg, failures)


def run_all(cfg: DemoConfig, runs: list[tuple[str, list[str]]], model: Path, train: Path, val: Path,
            runner: Optional[Callable[..., int]] = None) -> list[str]:
    """Every (seed, run) through stock main_ppo (``runner``: :func:`verl_hindsight.launch.run_main_ppo`), ``cfg.jobs``
    at a time, started in order; returns the failed run names. Runs are independent processes (each its own Ray
    instance), so a thread per running one only waits on it; each holds its own progress-bar line."""
    import queue
    from concurrent.futures import ThreadPoolExecutor

    if runner is None:
        from verl_hindsight.launch import run_main_ppo as runner

    free_lines: queue.Queue[int] = queue.Queue()
    for line in range(cfg.jobs):
        free_lines.put(line)

    def one(seed: int, name: str, extra: list[str]) -> Optional[str]:
        recipe = recipe_for(name, cfg.lora)
        out = cfg.run_dir / f"{name}-s{seed}"
        out.mkdir(exist_ok=True)
        overrides = run_overrides(cfg, model, train, val, seed, out) + extra + list(cfg.overrides)
        line = free_lines.get()
        try:
            rc = runner(recipe, overrides, out, cfg.steps, f"{name} seed {seed}", position=line)
        finally:
            free_lines.put(line)
        return None if rc == 0 else f"{name}-s{seed}"

    with ThreadPoolExecutor(max_workers=cfg.jobs) as pool:
        futures = [pool.submit(one, seed, name, extra) for seed in cfg.seed_range for name, extra in runs]
        return [f for f in (future.result() for future in futures) if f]


def recipe_for(name: str, lora: bool = False) -> str:
    """The recipe of a demo run: its name's method prefix (an ablation or comparison run is its method's recipe with
    extra overrides)."""
    prefix = max((p for p in RECIPES if name == p or name.startswith(p + "_")), key=len, default=name)
    return f"cpu/toy_{RECIPES.get(prefix, prefix)}{'_lora' if lora else ''}"


def planned_runs(cfg: DemoConfig) -> list[tuple[str, list[str]]]:
    """(run name, extra overrides) per seed: ``cfg.methods`` (main methods, ablation or comparison names, in order),
    then with ``cfg.ablations`` every ablation not already listed."""
    extra = {**ABLATIONS, **COMPARISON}
    unknown = [m for m in cfg.methods if m not in METHODS and m not in extra]
    if unknown:
        raise ValueError(f"unknown demo runs {unknown}; choose from {', '.join(METHODS + tuple(extra))}")
    names = list(cfg.methods) + ([a for a in ABLATIONS if a not in cfg.methods] if cfg.ablations else [])
    # a second invocation into the same folder must not mix two runs' metrics in one file
    made = [f"{n}-s{s}" for s in cfg.seed_range for n in names
            if (cfg.run_dir / f"{n}-s{s}" / "metrics.jsonl").exists()]
    if made:
        raise ValueError(f"{cfg.run_dir} already holds runs {made}; remove those folders, or pick other --methods, "
                         "--first-seed or --run-dir")
    if cfg.lora:
        from verl_hindsight.launch import recipes_dir

        missing = [n for n in names if not (recipes_dir() / f"{recipe_for(n, lora=True)}.yaml").is_file()]
        if missing:
            raise ValueError(f"--lora: no LoRA recipe for {missing}; drop --lora or those runs")
    return [(name, list(extra.get(name, []))) for name in names]


def finish(cfg: DemoConfig, failures: list[str]) -> int:
    from verl_hindsight.report.plots import plot_run
    from verl_hindsight.report.summary import summarize
    from verl_hindsight.report.viewer import build_viewer

    run_dir = cfg.run_dir
    plot = plot_run(run_dir)
    if cfg.ablations or any(m in ABLATIONS or m in COMPARISON for m in cfg.methods):
        from verl_hindsight.report.plots import plot_ablations

        for extra in plot_ablations(run_dir):
            print(f"ablation plot: {extra}")
    viewer = build_viewer(run_dir)
    text, _ = summarize(run_dir, threshold=0.8, budget=cfg.steps)
    (run_dir / "summary.txt").write_text(text + "\n")
    print()
    print(text)
    print(f"\nplot: {plot}\nviewer: {viewer}\nsummary: {run_dir / 'summary.txt'}")
    if failures:
        print(f"failed runs (see their verl.log): {', '.join(failures)}")
        return 1
    return 0


def default_run_dir(given: Optional[str]) -> Path:
    return Path(given or f"runs/demo-{time.strftime('%Y%m%d-%H%M%S')}").resolve()
