"""GRPO, SERL and HINT-SD with a real pretrained model on CPU: each phase's time and the peak memory, side by side.

    python benchmarks/pretrained_training.py [--envs toy bfcl] [--methods grpo serl hint_sd hint_sd_error]
                                             [--steps 2] [--format-steps 40] [--model DIR] [--run-dir DIR]

Each (environment, method) is `recipes/cpu/pretrained_<env>_<method>` through stock main_ppo for ``--steps``
steps, with google/gemma-3-270m (`verl-hindsight fetch-model gemma3-270m`) unless ``--model`` names another
folder. One task per step, 2 rollouts; the toy runs on its text loop, BFCL (base category, its two shortest
validation tasks: ~2.7k-token prompts) on the tool loop. HINT-SD's analyzer is the policy itself;
``hint_sd_error`` is HINT-SD with the environment's error message as the feedback instead (the teacher pass and the
distillation at the same lengths, for a model whose analyzer answers do not parse).

The base model never writes the toy's ``<action>`` tags, so without a start on the format no turn carries an action
and the teacher pass has nothing to score. ``--format-steps N`` (default 40; 0 to run the base model) first trains
the model on the toy's output format only (the demo's warm start without hints, keys unlabelled: nothing about which
key is right) and runs the toy on that model; BFCL always runs the model as given.

Prints, per run and averaged over steps 2..N (step 1 includes warm-up; with --steps 1, step 1): verl's phase timers
(``timing_s/*``: generation, old log-probs, reference, the teacher pass, the hindsight stage, the update, the weight
sync), the step time and its ratio to GRPO's on the same environment, the tokens per step, and the peak resident
memory of the whole run (the main_ppo process tree, sampled every second).
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import threading
import time
from pathlib import Path

# benchmark-only runs: (recipe method, extra overrides)
VARIANTS = {"hint_sd_error": ("hint_sd", ["hindsight.feedback.source=error", "hindsight.targets.turns=with_feedback",
                                         "hindsight.analyzer.role=none"])}
PHASES = ("gen", "old_log_prob", "ref", "hindsight_teacher", "hindsight_stage", "update_actor", "update_weights")
# BFCL's base-category validation tasks with the shortest prompts under Gemma's tokenizer (function docs included)
BFCL_TASKS = ("multi_turn_base_10", "multi_turn_base_25")


def toy_data(out: Path) -> tuple[Path, Path]:
    from verl_hindsight.environment.data import write_env_dataset

    return write_env_dataset("toy", out, max_train=8, max_val=2)


def bfcl_data(out: Path) -> tuple[Path, Path]:
    import pandas as pd

    from verl_hindsight.environment.data import env_rows

    rows = [r for r in env_rows("bfcl", "val", {"category": "base"}) if r["extra_info"]["task_id"] in BFCL_TASKS]
    out.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows).to_parquet(out / "train.parquet")
    pd.DataFrame(rows[:1]).to_parquet(out / "val.parquet")
    return out / "train.parquet", out / "val.parquet"


def format_start(model: Path, out: Path, steps: int) -> Path:
    """The toy's output format taught to ``model`` (no hints, un-hinted keys unlabelled); prints how many of 8
    sampled first answers then carry an action."""
    from verl_hindsight.demo.warm_start import warm_start

    if not (out / "config.json").is_file():
        start = time.monotonic()
        warm_start(model, out, steps=steps, lr=1e-5, hint_prob=0.0, batch_size=4, unhinted_target="none")
        if (model / "NOTICE").is_file():  # the Gemma Terms of Use travel with a model derived from it
            shutil.copy(model / "NOTICE", out / "NOTICE")
        print(f"format start: {steps} steps in {time.monotonic() - start:.0f} s -> {out}", flush=True)
    print(f"format start: {tagged_answers(out)}/8 sampled first answers carry an <action> tag", flush=True)
    return out


def tagged_answers(model_dir: Path, n: int = 8) -> int:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from verl_hindsight.agent_loops.prompts import initial_messages
    from verl_hindsight.environment.protocol import make_env

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    env = make_env("toy")
    torch.manual_seed(0)
    tagged = 0
    for task in env.task_ids("val")[:n]:
        ids = tok.apply_chat_template(initial_messages(env.instructions, env.reset(task).text),
                                      add_generation_prompt=True, return_tensors="pt", return_dict=True)
        out = model.generate(**ids, max_new_tokens=16, do_sample=True, temperature=1.0)
        tagged += "<action>" in tok.decode(out[0, ids["input_ids"].shape[1]:])
    return tagged


class PeakMemory:
    """Peak summed RSS of a process and its descendants (Ray's GCS, raylet and workers are the driver's)."""

    def __init__(self):
        self.peak = 0
        self._stop = threading.Event()
        self.pid = None

    def _sample(self) -> None:
        import psutil

        while not self._stop.wait(1.0):
            if self.pid is None:
                continue
            try:
                root = psutil.Process(self.pid)
                procs = [root, *root.children(recursive=True)]
            except psutil.NoSuchProcess:
                continue
            total = 0
            for p in procs:
                try:
                    total += p.memory_info().rss
                except psutil.NoSuchProcess:
                    pass
            self.peak = max(self.peak, total)

    def __enter__(self):
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def run(recipe: str, overrides: list[str], run_dir: Path) -> tuple[int, list[dict], float, float]:
    import os
    import subprocess

    from verl_hindsight.launch import main_ppo_command, read_metrics

    run_dir.mkdir(parents=True, exist_ok=True)
    metrics = run_dir / "metrics.jsonl"
    metrics.unlink(missing_ok=True)
    cmd = main_ppo_command(recipe, [*overrides, f"trainer.default_local_dir={run_dir / 'ckpt'}"])
    (run_dir / "command.txt").write_text(" ".join(cmd) + "\n")
    env = dict(os.environ, VERL_FILE_LOGGER_PATH=str(metrics), PYTHONUNBUFFERED="1")
    start = time.monotonic()
    with open(run_dir / "verl.log", "w") as log, PeakMemory() as mem:
        proc = subprocess.Popen(cmd, cwd=run_dir, env=env, stdout=log, stderr=subprocess.STDOUT)
        mem.pid = proc.pid
        code = proc.wait()
    return code, [r["data"] for r in read_metrics(metrics)], mem.peak / 2**30, time.monotonic() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--envs", nargs="+", default=["toy", "bfcl"], choices=["toy", "bfcl"])
    parser.add_argument("--methods", nargs="+", default=["grpo", "serl", "hint_sd", "hint_sd_error"],
                        choices=["grpo", "serl", "hint_sd", *VARIANTS])
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--format-steps", type=int, default=40,
                        help="toy output-format warm start of the model first (0: the base model as given)")
    parser.add_argument("--model", default=None, help="a transformers folder (default: fetch-model gemma3-270m)")
    parser.add_argument("--run-dir", default=None)
    parser.add_argument("--override", action="append", default=[], help="a hydra override for every run")
    args = parser.parse_args()

    from verl_hindsight.models import fetch_model

    model = Path(args.model) if args.model else fetch_model("gemma3-270m")
    run_dir = Path(args.run_dir or f"runs/bench-pretrained-{time.strftime('%Y%m%d-%H%M%S')}").resolve()
    print(f"model {model}; runs in {run_dir}")
    toy_model = model
    if "toy" in args.envs and args.format_steps > 0:
        toy_model = format_start(model, run_dir / "format_model", args.format_steps)
    header = ("| env | method | step s | vs GRPO | " + " | ".join(PHASES) + " | tokens/step | targeted tokens "
              "| peak RSS GiB | wall s |")
    rows = [header, "|" + "---|" * (header.count("|") - 1)]
    for env in args.envs:
        train, val = (toy_data if env == "toy" else bfcl_data)(run_dir / f"data-{env}")
        grpo_step = None
        for method in args.methods:
            recipe, extra = VARIANTS.get(method, (method, []))
            code, metrics, peak, wall = run(f"cpu/pretrained_{env}_{recipe}", [
                f"actor_rollout_ref.model.path={toy_model if env == 'toy' else model}", f"data.train_files={train}",
                f"data.val_files={val}", f"trainer.total_training_steps={args.steps}", *extra, *args.override],
                run_dir / f"{env}-{method}")
            steps = [m for m in metrics if "timing_s/step" in m]
            if code != 0 or len(steps) < args.steps:
                rows.append(f"| {env} | {method} | failed (exit {code}, {len(steps)} steps; "
                            f"{run_dir / f'{env}-{method}' / 'verl.log'}) |")
                print(rows[-1], flush=True)
                continue
            measured = steps[1:] if len(steps) > 1 else steps
            mean = lambda key: statistics.mean(m.get(key, 0.0) for m in measured)  # noqa: E731
            step = mean("timing_s/step")
            if method == "grpo":
                grpo_step = step
            ratio = f"{step / grpo_step:.2f}x" if grpo_step else "-"
            rows.append(f"| {env} | {method} | {step:.0f} | {ratio} | "
                        + " | ".join(f"{mean(f'timing_s/{p}'):.1f}" for p in PHASES)
                        + f" | {mean('perf/total_num_tokens'):.0f} | {mean('hindsight/targeted_tokens'):.0f}"
                        + f" | {peak:.1f} | {wall:.0f} |")
            print(rows[-1], flush=True)
    print("\n".join(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
