"""The demo's closing table: final validation success and steps to reach a threshold, per method and seed."""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Optional

from verl_hindsight.report.runs import load_runs


def steps_to(steps: list[int], values: list[float], threshold: float) -> Optional[int]:
    return next((s for s, v in zip(steps, values) if v >= threshold), None)


def summarize(run_dir: Path, threshold: float = 0.8, budget: Optional[int] = None) -> tuple[str, dict]:
    """Text table and data. A seed that never reaches ``threshold`` counts at ``budget`` (default: its last step)
    in the median, as the issue asks ("a GRPO run that stalls counts at the budget")."""
    per_method: dict[str, list[dict]] = {}
    for run in load_runs(run_dir):
        key = run.val_key()
        steps, values = run.series(key) if key else ([], [])
        reached = steps_to(steps, values, threshold)
        per_method.setdefault(run.method, []).append({
            "seed": run.seed, "final": values[-1] if values else None, "best": max(values) if values else None,
            "steps_to_threshold": reached, "last_step": run.steps[-1] if run.steps else 0, "val_key": key})
    data: dict = {"threshold": threshold, "methods": {}}
    lines = [f"validation success (threshold {threshold:.0%}; '>B' = not reached within B steps)",
             f"{'method':<22}{'seed':>5}{'final':>8}{'best':>8}{'steps to ' + format(threshold, '.0%'):>16}"]
    for method, seeds in sorted(per_method.items()):
        counted = []
        for r in sorted(seeds, key=lambda r: r["seed"]):
            limit = budget if budget is not None else r["last_step"]
            counted.append(r["steps_to_threshold"] if r["steps_to_threshold"] is not None else limit)
            reached = str(r["steps_to_threshold"]) if r["steps_to_threshold"] is not None else f">{limit}"
            fmt = lambda x: "-" if x is None else f"{x:.2f}"  # noqa: E731
            lines.append(f"{method:<22}{r['seed']:>5}{fmt(r['final']):>8}{fmt(r['best']):>8}{reached:>16}")
        median = statistics.median(counted) if counted else None
        data["methods"][method] = {"runs": seeds, "median_steps": median,
                                   "reached": sum(r["steps_to_threshold"] is not None for r in seeds)}
        lines.append(f"{'':<22}{'median steps (stalled runs at the budget)':>37}: {median}")
    hint, grpo = data["methods"].get("hint_sd"), data["methods"].get("grpo")
    if hint and grpo and grpo["median_steps"]:
        data["hint_sd_over_grpo"] = hint["median_steps"] / grpo["median_steps"]
        lines.append(f"HINT-SD / GRPO median steps: {data['hint_sd_over_grpo']:.2f}")
    return "\n".join(lines), data
