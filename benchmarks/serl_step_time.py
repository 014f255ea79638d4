"""Step time of SERL vs GRPO on the same CPU config, side by side in one run, through stock main_ppo.

    python benchmarks/serl_step_time.py [--steps 6] [--run-dir runs/bench-serl]

Three runs of the toy environment with the same tiny format-warm-started model, data, seeds and sizes:
- ``grpo``:   recipes/cpu/toy_grpo;
- ``serl``:   recipes/cpu/toy_serl (lambda > 0: the teacher pass runs every step);
- ``serl_l0``: toy_serl with ``algorithm.serl.mixing_lambda=0`` (lambda = 0 from the start: no teacher pass).
Prints the mean ``timing_s/step`` over steps 2..N (step 1 includes warm-up) and the ratios to GRPO.
Targets: SERL <= 1.3x GRPO while lambda > 0, and equal to GRPO once lambda = 0.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--run-dir", default=None)
    args = parser.parse_args()

    from verl_hindsight.launch import read_metrics, run_main_ppo
    from verl_hindsight.environment.data import write_env_dataset
    from verl_hindsight.tiny_model import make_tiny_model

    sys.path.insert(0, str(ROOT / "tests"))
    from format_sft import format_sft

    run_dir = Path(args.run_dir or f"runs/bench-serl-{time.strftime('%Y%m%d-%H%M%S')}").resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    model = format_sft(make_tiny_model(run_dir / "tiny"), run_dir / "model")
    train, val = write_env_dataset("toy", run_dir / "data", max_train=64, max_val=4)
    base = [f"actor_rollout_ref.model.path={model}", f"data.train_files={train}", f"data.val_files={val}"]
    runs = {"grpo": ("cpu/toy_grpo", []), "serl": ("cpu/toy_serl", []),
            "serl_l0": ("cpu/toy_serl", ["algorithm.serl.mixing_lambda=0.0"])}
    times = {}
    for name, (recipe, extra) in runs.items():
        out = run_dir / name
        out.mkdir(exist_ok=True)
        if run_main_ppo(recipe, base + extra, out, args.steps, name) != 0:
            return 1
        rows = sorted((r for r in read_metrics(out / "metrics.jsonl")), key=lambda r: r["step"])
        steps = [r["data"]["timing_s/step"] for r in rows if r["step"] >= 2]
        active = [r["data"].get("hindsight/stage_active") for r in rows]
        times[name] = statistics.fmean(steps)
        print(f"{name:8s} mean step (steps 2..{args.steps}): {times[name]:.3f} s   "
              f"per step: {', '.join(f'{t:.2f}' for t in steps)}   teacher pass active: {active}")
    print(f"serl / grpo    = {times['serl'] / times['grpo']:.2f}x  (target <= 1.3x while lambda > 0)")
    print(f"serl_l0 / grpo = {times['serl_l0'] / times['grpo']:.2f}x  (target: equal once lambda = 0)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
