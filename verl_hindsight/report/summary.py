"""The demo's closing table: final validation success and steps to reach a threshold, per method and seed.

The validation metric is chosen per run and named in the table: ``hindsight/val_success`` when logged, else the first
``val-core/.../mean@1`` key (``Run.val_key``). Steps to the threshold = the first test step whose validation success is
>= the threshold; a seed that never gets there is ``None`` and counts at the budget (default: its last logged step) in
the method's median.
"""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Optional, Union

from verl_hindsight.report.runs import load_runs


def steps_to(steps: list[int], values: list[float], threshold: float) -> Optional[int]:
    return next((s for s, v in zip(steps, values) if v >= threshold), None)


def _fmt(x: Optional[float]) -> str:
    return "-" if x is None else f"{x:.2f}"


def summarize(run_dir: Union[str, Path], threshold: float = 0.8,
              budget: Optional[int] = None) -> tuple[str, dict]:
    """Text table and data. ``data["methods"][m]`` has ``runs`` (per seed: final, best, steps_to_threshold,
    last_step, val_key), ``median_steps`` (stalled seeds at the budget), ``reached`` and ``seeds``;
    ``data["hint_sd_over_grpo"]`` is HINT-SD's median over GRPO's, and ``data["ratios_to_grpo"]`` the same for
    every method."""
    per_method: dict[str, list[dict]] = {}
    for run in load_runs(Path(run_dir)):
        key = run.val_key()
        steps, values = run.series(key) if key else ([], [])
        reached = steps_to(steps, values, threshold)
        per_method.setdefault(run.method, []).append({
            "seed": run.seed, "final": values[-1] if values else None, "best": max(values) if values else None,
            "steps_to_threshold": reached, "last_step": run.steps[-1] if run.steps else 0, "val_key": key})
    data: dict = {"threshold": threshold, "budget": budget, "methods": {}}
    keys = sorted({r["val_key"] or "-" for seeds in per_method.values() for r in seeds})
    head = f"steps to {threshold:.0%}"
    lines = [f"validation success ({', '.join(keys)}); threshold {threshold:.0%}; '>B' = not reached within B steps",
             f"{'method':<24}{'seed':>5}{'final':>8}{'best':>8}{head:>14}"]
    for method, seeds in sorted(per_method.items()):
        seeds.sort(key=lambda r: r["seed"])
        counted = []
        for r in seeds:
            limit = budget if budget is not None else r["last_step"]
            counted.append(r["steps_to_threshold"] if r["steps_to_threshold"] is not None else limit)
            reached = str(r["steps_to_threshold"]) if r["steps_to_threshold"] is not None else f">{limit}"
            lines.append(f"{method:<24}{r['seed']:>5}{_fmt(r['final']):>8}{_fmt(r['best']):>8}{reached:>14}")
        median = statistics.median(counted) if counted else None
        n_reached = sum(r["steps_to_threshold"] is not None for r in seeds)
        data["methods"][method] = {"runs": seeds, "median_steps": median, "reached": n_reached, "seeds": len(seeds)}
        note = " (runs that did not reach it count at the budget)" if n_reached < len(seeds) else ""
        lines.append(f"{'':<24}median steps {median}{note}; reached {n_reached}/{len(seeds)}")
    grpo = data["methods"].get("grpo")
    if grpo and grpo["median_steps"]:
        data["ratios_to_grpo"] = {m: v["median_steps"] / grpo["median_steps"] for m, v in data["methods"].items()
                                  if m != "grpo" and v["median_steps"] is not None}
        if "hint_sd" in data["ratios_to_grpo"]:
            data["hint_sd_over_grpo"] = data["ratios_to_grpo"]["hint_sd"]
        for m, ratio in data["ratios_to_grpo"].items():
            lines.append(f"{m} / grpo median steps: {ratio:.2f}")
    return "\n".join(lines), data
