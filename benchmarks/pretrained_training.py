"""GRPO, SERL and HINT-SD with a real pretrained model on CPU: each phase's time and the peak memory, side by side.

    python benchmarks/pretrained_training.py [--envs toy bfcl] [--methods grpo serl hint_sd] [--steps 2]
                                             [--model DIR] [--run-dir DIR]

Each (environment, method) is `recipes/cpu/pretrained_<env>_<method>` through stock main_ppo for ``--steps``
steps, with google/gemma-3-270m (`verl-hindsight fetch-model gemma3-270m`) unless ``--model`` names another
folder. One task per step, 2 rollouts; the toy runs on its text loop, BFCL (base category, its two shortest
validation tasks: ~2.7k-token prompts) on the tool loop. HINT-SD's analyzer is the policy itself.

Prints, per run and averaged over steps 2..N (step 1 includes warm-up; with --steps 1, step 1): verl's phase timers
(``timing_s/*``: generation, old log-probs, reference, the teacher pass, the hindsight stage, the update, the weight
sync), the step time and its ratio to GRPO's on the same environment, the tokens per step, and the peak resident
memory of the whole run (the main_ppo process tree, sampled every second).
"""

from __future__ import annotations

import argparse
import statistics
import threading
import time
from pathlib import Path

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
    parser.add_argument("--methods", nargs="+", default=["grpo", "serl", "hint_sd"],
                        choices=["grpo", "serl", "hint_sd"])
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--model", default=None, help="a transformers folder (default: fetch-model gemma3-270m)")
    parser.add_argument("--run-dir", default=None)
    parser.add_argument("--override", action="append", default=[], help="a hydra override for every run")
    args = parser.parse_args()

    from verl_hindsight.models import fetch_model

    model = Path(args.model) if args.model else fetch_model("gemma3-270m")
    run_dir = Path(args.run_dir or f"runs/bench-pretrained-{time.strftime('%Y%m%d-%H%M%S')}").resolve()
    print(f"model {model}; runs in {run_dir}")
    header = ("| env | method | step s | vs GRPO | " + " | ".join(PHASES) + " | tokens/step | peak RSS GiB | wall s |")
    rows = [header, "|" + "---|" * (header.count("|") - 1)]
    for env in args.envs:
        train, val = (toy_data if env == "toy" else bfcl_data)(run_dir / f"data-{env}")
        grpo_step = None
        for method in args.methods:
            code, metrics, peak, wall = run(f"cpu/pretrained_{env}_{method}", [
                f"actor_rollout_ref.model.path={model}", f"data.train_files={train}", f"data.val_files={val}",
                f"trainer.total_training_steps={args.steps}", *args.override], run_dir / f"{env}-{method}")
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
                        + f" | {mean('perf/total_num_tokens'):.0f} | {peak:.1f} | {wall:.0f} |")
            print(rows[-1], flush=True)
    print("\n".join(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
