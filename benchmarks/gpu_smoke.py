"""GPU smoke test: the shipped GPU recipes through stock ``main_ppo`` on one GPU, two steps each.

    python benchmarks/gpu_smoke.py                 # vLLM rollout (needs `pip install ".[vllm]"`)
    python benchmarks/gpu_smoke.py --rollout hf    # the plugin's transformers rollout (no vLLM needed)
    python benchmarks/gpu_smoke.py --jobs 4        # the four training checks at once (one GPU each if there are 4)
    python benchmarks/gpu_smoke.py --dry-run       # print the commands, check every config composes (any machine)

A random tiny model and the toy corridor are built on the spot, offline. Each check prints one
``PASS``/``FAIL`` line; the exit status is the number of failed checks. Never part of CI: CI has no GPU
(tests/unit/test_gpu_smoke.py runs the dry run). Runs write under ``--workdir`` (default: a temporary folder),
one folder per check with ``verl.log``, ``metrics.jsonl`` and ``command.txt``.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class Check:
    name: str
    recipe: str  # a shipped GPU recipe (recipes/<name>.yaml)
    overrides: list[str] = field(default_factory=list)
    # metrics that must be > 0 at some step (the method's own path ran, on > 0 tokens)
    positive: tuple[str, ...] = ()
    # metrics that must be finite at every step where they are logged
    finite: tuple[str, ...] = ("actor/pg_loss",)
    teacher_checkpoint: bool = False


STEPS = 2

# The generic GPU recipes (recipes/{grpo,serl,hint_sd}.yaml, common/gpu.yaml) sized down to a tiny model and the
# toy corridor. Everything else (FSDP2, remove-padding, no KL so the teacher takes the reference role, the
# plugin's trainer mode, the agent loop) is the recipe's own.
def toy_overrides(model: Path, data: Path, rollout: str) -> list[str]:
    return [
        f"actor_rollout_ref.model.path={model}",
        f"data.train_files={data / 'train.parquet'}", f"data.val_files={data / 'val.parquet'}",
        "trainer.n_gpus_per_node=1", "data.train_batch_size=4", "data.max_prompt_length=256",
        "data.max_response_length=256", "data.dataloader_num_workers=0",
        "actor_rollout_ref.actor.ppo_mini_batch_size=4",
        # the recipes batch by tokens; a budget of one toy row splits each pass into several micro-batches, as the
        # recipes' budgets of 2-4 full rows do on real episodes
        "actor_rollout_ref.actor.ppo_max_token_len_per_gpu=512",
        "actor_rollout_ref.actor.optim.lr=1e-4",
        "actor_rollout_ref.rollout.n=4", f"actor_rollout_ref.rollout.name={rollout}",
        "actor_rollout_ref.rollout.gpu_memory_utilization=0.3", "actor_rollout_ref.rollout.max_model_len=512",
        "actor_rollout_ref.rollout.agent.num_workers=1", "reward.num_workers=1",
        "hindsight.env.max_turns=8", "hindsight.env.episode_timeout_s=300",
        f"trainer.total_training_steps={STEPS}", "trainer.val_before_train=false", "trainer.test_freq=-1",
        "trainer.save_freq=-1", "trainer.logger=[console,file]",
    ]


# HINT-SD's analyzer needs a model that writes JSON; the toy's own error feedback stands in for it, so the
# teacher pass and the loss run on real targets.
_HINT_SD_TOY = ["hindsight.analyzer.role=none", "hindsight.feedback.source=error",
                "hindsight.targets.turns=with_feedback", "hindsight.targets.span=message"]

CHECKS = (
    Check("grpo", "grpo"),
    Check("serl_lagged", "serl", ["hindsight.teacher.sync_interval=1"],
          positive=("serl/hindsight_tokens", "hindsight/teacher_tokens_forwarded", "hindsight/teacher_update_mean_abs"),
          finite=("actor/pg_loss", "serl/weight_mean")),
    Check("hint_sd_k3_ema", "hint_sd", [*_HINT_SD_TOY, "hindsight.distill.divergence=k3", f"trainer.save_freq={STEPS}"],
          positive=("hindsight/targeted_tokens", "hindsight/teacher_update_mean_abs"),
          finite=("actor/hindsight/distill_loss",), teacher_checkpoint=True),
    Check("hint_sd_topk_tail_ema", "hint_sd",
          [*_HINT_SD_TOY, "hindsight.distill.divergence=topk_tail", "hindsight.distill.topk=8"],
          positive=("hindsight/targeted_tokens",), finite=("actor/hindsight/distill_loss",)),
)


def overrides(check: Check, base: list[str], run_dir: Path) -> list[str]:
    return [*base, *check.overrides, f"trainer.default_local_dir={run_dir / 'ckpt'}"]


def command(check: Check, base: list[str], run_dir: Path) -> list[str]:
    from verl_hindsight.launch import main_ppo_command

    return main_ppo_command(check.recipe, overrides(check, base, run_dir))


def compose(check: Check, base: list[str], run_dir: Path):
    """The config main_ppo would build from ``command()``, checked as main_ppo and the plugin check it."""
    from verl_hindsight.plan import compose_recipe, validate

    cfg = compose_recipe(check.recipe, overrides(check, base, run_dir))
    validate(cfg)
    return cfg


def judge(check: Check, rc: int, run_dir: Path) -> str:
    """'' when the run did what the check asks, else the first reason it did not."""
    log = (run_dir / "verl.log").read_text(errors="replace") if (run_dir / "verl.log").exists() else ""
    if rc != 0:
        errors = [line for line in log.splitlines() if "Error" in line or "error:" in line]
        return f"exit {rc}: {(errors or log.splitlines() or ['no output'])[-1][:300]}"
    from verl_hindsight.launch import read_metrics

    rows = [r["data"] | {"step": r["step"]} for r in read_metrics(run_dir / "metrics.jsonl")]
    steps = sorted({r["step"] for r in rows})
    if steps[-1:] != [STEPS]:
        return f"logged steps {steps}, expected up to {STEPS}"
    for key in check.finite:
        values = [r[key] for r in rows if key in r]
        if not values:
            return f"{key} never logged"
        if not all(math.isfinite(v) for v in values):
            return f"{key} not finite: {values}"
    for key in check.positive:
        if not any(r.get(key, 0) > 0 for r in rows):
            return f"{key} never > 0: {[r.get(key) for r in rows]}"
    if check.teacher_checkpoint and not list((run_dir / "ckpt").rglob("teacher_rank0.pt")):
        return "no teacher checkpoint (teacher_rank0.pt) under the run's checkpoint folder"
    return ""


PLATFORM_PROBE = r"""
import json
from verl.plugin.platform.platform_manager import get_platform
from verl.workers.rollout.replica import RolloutReplicaRegistry, _load_vllm
print(json.dumps([type(get_platform()).__name__, RolloutReplicaRegistry._registry["vllm"] is _load_vllm]))
"""


def check_platform() -> str:
    """The driver and a GPU-less actor (devices hidden, as Ray hides them) both keep verl's CUDA platform."""
    for hidden in (False, True):
        env = {k: v for k, v in os.environ.items() if k != "VERL_PLATFORM"}
        if hidden:
            env["CUDA_VISIBLE_DEVICES"] = ""
        out = subprocess.run([sys.executable, "-c", PLATFORM_PROBE], env=env, capture_output=True, text=True)
        if out.returncode != 0:
            return f"probe failed: {out.stderr.strip().splitlines()[-1:]}"
        platform, vllm_is_verls = json.loads(out.stdout.strip().splitlines()[-1])
        if platform != "PlatformCUDA" or not vllm_is_verls:
            return f"{'GPU-less actor' if hidden else 'driver'}: platform {platform}, verl's vLLM loader {vllm_is_verls}"
    return ""


@functools.cache
def _gpu_count() -> int:
    import torch

    return torch.cuda.device_count()


def _stop_ray() -> None:
    """A run killed at its timeout can leave its Ray node behind."""
    subprocess.run([sys.executable, "-m", "ray.scripts.scripts", "stop", "--force"], capture_output=True)


def prepare(workdir: Path, format_steps: int) -> tuple[Path, Path]:
    """A tiny random model taught the toy's ``<action>`` format (keys at random), and the toy's data. A model
    that never writes an action gives SERL and HINT-SD no action tokens to work on."""
    from verl_hindsight.demo.warm_start import warm_start
    from verl_hindsight.environment.data import write_env_dataset
    from verl_hindsight.tiny_model import make_tiny_model

    raw, model, data = workdir / "tiny_model", workdir / "format_model", workdir / "toy_data"
    if not (raw / "config.json").exists():
        make_tiny_model(raw)
    if format_steps == 0:
        model = raw
    elif not (model / "config.json").exists():
        warm_start(raw, model, steps=format_steps, hint_prob=0.0)
    if not (data / "train.parquet").exists():
        write_env_dataset("toy", data, max_train=64, max_val=8)
    return model, data


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rollout", choices=("vllm", "hf"), default="vllm")
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--only", nargs="*", default=None,
                        help="names of the checks to run: platform and those of CHECKS")
    parser.add_argument("--dry-run", action="store_true", help="print the commands and compose every config")
    parser.add_argument("--timeout-s", type=int, default=240, help="per check")
    parser.add_argument("--jobs", type=int, default=1,
                        help="checks run at once (one GPU each when there are enough, else sharing the GPU)")
    parser.add_argument("--format-steps", type=int, default=120,
                        help="supervised steps teaching the tiny model the action format (0: the random model)")
    parser.add_argument("--override", action="append", default=[],
                        help="an extra main_ppo override for every check (repeatable), e.g. a real model's path")
    args = parser.parse_args(argv)

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="gpu_smoke_"))
    workdir.mkdir(parents=True, exist_ok=True)
    model, data = prepare(workdir, 0 if args.dry_run else args.format_steps)
    base = [*toy_overrides(model, data, args.rollout), *args.override]
    checks = [c for c in CHECKS if args.only is None or c.name in args.only]
    failures: list[str] = []  # appended to from the threads of --jobs

    def report(name: str, reason: str, seconds: float) -> None:
        if reason:
            failures.append(name)
        print(f"{'FAIL' if reason else 'PASS'} {name} ({seconds:.0f} s){': ' + reason if reason else ''}", flush=True)

    if args.dry_run:
        for check in checks:
            run_dir = workdir / check.name
            print(" ".join(command(check, base, run_dir)))
            start = time.time()
            try:
                compose(check, base, run_dir)
                reason = ""
            except Exception as exc:  # reported, not raised: every check gets its line
                reason = f"{type(exc).__name__}: {exc}"
            report(f"{check.name} composes", reason, time.time() - start)
        return len(failures)

    if args.only is None or "platform" in args.only:
        start = time.time()
        report("platform", check_platform(), time.time() - start)
    if args.jobs > 1 and args.rollout == "vllm" and _gpu_count() < args.jobs:
        # vLLM reserves its share of the card at start: the shares of checks sharing one GPU must add up to < 1
        base = [o for o in base if not o.startswith("actor_rollout_ref.rollout.gpu_memory_utilization=")]
        base.append(f"actor_rollout_ref.rollout.gpu_memory_utilization={0.8 / args.jobs:.2f}")

    def run_one(index: int, check: Check) -> None:
        run_dir = workdir / check.name
        run_dir.mkdir(parents=True, exist_ok=True)
        cmd = command(check, base, run_dir)
        (run_dir / "command.txt").write_text(" ".join(cmd) + "\n")
        env = dict(os.environ, VERL_FILE_LOGGER_PATH=str(run_dir / "metrics.jsonl"), PYTHONUNBUFFERED="1")
        if args.jobs > 1 and _gpu_count() >= args.jobs:
            env["CUDA_VISIBLE_DEVICES"] = str(index % args.jobs)
        start = time.time()
        with open(run_dir / "verl.log", "w") as log:
            try:
                rc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=run_dir, env=env,
                                    timeout=args.timeout_s).returncode
            except subprocess.TimeoutExpired:
                rc = 124
        if args.jobs == 1:
            _stop_ray()
        report(check.name, judge(check, rc, run_dir), time.time() - start)

    # each main_ppo starts its own local Ray cluster, so checks can share a machine without sharing a cluster
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        list(pool.map(run_one, range(len(checks)), checks))
    if args.jobs > 1:
        _stop_ray()
    ran = len(checks) + (args.only is None or "platform" in args.only)
    print(f"{ran - len(failures)}/{ran} checks passed; runs under {workdir}")
    return len(failures)


if __name__ == "__main__":
    sys.exit(main())
