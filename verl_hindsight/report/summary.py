"""The demo's closing table: final validation success and steps to reach a threshold, per method and seed, with the
run's invalid-action rate and the share of targeted tokens whose advantage changed sign.

The validation metric is chosen per run and named in the table: ``hindsight/val_success`` when logged, else the first
``val-core/.../mean@1`` key (``Run.val_key``). Steps to the threshold = the first test step whose validation success is
>= the threshold; a seed that never gets there is ``None`` and counts at the budget (default: its last logged step) in
the method's median. Invalid actions: ``hindsight/invalid_action_rate`` (invalid actions / turns of a step's
episodes), as its mean over the run's training steps and as the count of steps above 0.25 (the drift measure of
docs/demo.md). Sign flips: ``serl/sign_flipped_frac`` over the run, weighted by each step's targeted tokens
(``serl/hindsight_tokens``); runs without the SERL step show "-".
"""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Optional, Union

from verl_hindsight.report.runs import Run, load_runs


def steps_to(steps: list[int], values: list[float], threshold: float) -> Optional[int]:
    return next((s for s, v in zip(steps, values) if v >= threshold), None)


INVALID_KEY = "hindsight/invalid_action_rate"
INVALID_DRIFT = 0.25  # a step above this invalid-action rate counts as drifting from the warm start's format
FLIP_KEY = "serl/sign_flipped_frac"
TOKENS_KEY = "serl/hindsight_tokens"


def _fmt(x: Optional[float]) -> str:
    return "-" if x is None else f"{x:.2f}"


def invalid_actions(run: Run) -> tuple[Optional[float], Optional[int]]:
    """(mean invalid-action rate over the run's steps, steps above ``INVALID_DRIFT``); (None, None) if not logged."""
    _, rates = run.series(INVALID_KEY)
    if not rates:
        return None, None
    return sum(rates) / len(rates), sum(r > INVALID_DRIFT for r in rates)


def sign_flipped(run: Run) -> Optional[float]:
    """Share of the run's targeted tokens whose advantage got the opposite sign (each step weighted by its targeted
    tokens); None without the SERL step."""
    steps = [(float(m[FLIP_KEY]), float(m.get(TOKENS_KEY, 1.0))) for m in run.metrics if FLIP_KEY in m]
    tokens = sum(n for _, n in steps)
    return sum(f * n for f, n in steps) / tokens if tokens else None


def summarize(run_dir: Union[str, Path], threshold: float = 0.8,
              budget: Optional[int] = None) -> tuple[str, dict]:
    """Text table and data. ``data["methods"][m]`` has ``runs`` (per seed: final, best, steps_to_threshold,
    last_step, val_key, invalid_action_rate, invalid_steps, sign_flipped_frac, cut: ended before ``budget``
    without reaching the threshold), ``median_steps`` (stalled seeds at the budget), ``reached`` and ``seeds``;
    ``data["hint_sd_over_grpo"]`` is HINT-SD's median over GRPO's, and ``data["ratios_to_grpo"]`` the same for
    every method."""
    per_method: dict[str, list[dict]] = {}
    for run in load_runs(Path(run_dir)):
        key = run.val_key()
        steps, values = run.series(key) if key else ([], [])
        reached = steps_to(steps, values, threshold)
        invalid, drifting = invalid_actions(run)
        per_method.setdefault(run.method, []).append({
            "seed": run.seed, "final": values[-1] if values else None, "best": max(values) if values else None,
            "steps_to_threshold": reached, "last_step": run.steps[-1] if run.steps else 0, "val_key": key,
            "invalid_action_rate": invalid, "invalid_steps": drifting, "sign_flipped_frac": sign_flipped(run)})
    data: dict = {"threshold": threshold, "budget": budget, "methods": {}}
    keys = sorted({r["val_key"] or "-" for seeds in per_method.values() for r in seeds})
    head = f"steps to {threshold:.0%}"
    lines = [f"validation success ({', '.join(keys)}); threshold {threshold:.0%}; '>B' = not reached within B steps",
             f"invalid: mean invalid-action rate; >{INVALID_DRIFT}: steps above it; flipped: share of targeted tokens "
             "whose advantage changed sign",
             f"{'method':<24}{'seed':>5}{'final':>8}{'best':>8}{head:>14}{'invalid':>9}{f'>{INVALID_DRIFT}':>7}"
             f"{'flipped':>9}"]
    for method, seeds in sorted(per_method.items()):
        seeds.sort(key=lambda r: r["seed"])
        counted = []
        for r in seeds:
            limit = budget if budget is not None else r["last_step"]
            counted.append(r["steps_to_threshold"] if r["steps_to_threshold"] is not None else limit)
            r["cut"] = r["steps_to_threshold"] is None and budget is not None and r["last_step"] < budget
            if r["steps_to_threshold"] is not None:
                reached = str(r["steps_to_threshold"])
            else:
                reached = f"cut@{r['last_step']}" if r["cut"] else f">{limit}"
            drifting = "-" if r["invalid_steps"] is None else str(r["invalid_steps"])
            flipped = "-" if r["sign_flipped_frac"] is None else f"{r['sign_flipped_frac']:.3f}"
            lines.append(f"{method:<24}{r['seed']:>5}{_fmt(r['final']):>8}{_fmt(r['best']):>8}{reached:>14}"
                         f"{_fmt(r['invalid_action_rate']):>9}{drifting:>7}{flipped:>9}")
        median = statistics.median(counted) if counted else None
        n_reached = sum(r["steps_to_threshold"] is not None for r in seeds)
        data["methods"][method] = {"runs": seeds, "median_steps": median, "reached": n_reached, "seeds": len(seeds)}
        note = " (runs that did not reach it count at the budget)" if n_reached < len(seeds) else ""
        lines.append(f"{'':<24}median steps {median}{note}; reached {n_reached}/{len(seeds)}")
    if any(r.get("cut") for seeds in per_method.values() for r in seeds):
        lines.append(f"cut@N: the run ended at step N, before the budget of {budget}, without reaching the threshold "
                     "(stopped, failed or still running); the median counts it at the budget")
    grpo = data["methods"].get("grpo")
    if grpo and grpo["median_steps"]:
        data["ratios_to_grpo"] = {m: v["median_steps"] / grpo["median_steps"] for m, v in data["methods"].items()
                                  if m != "grpo" and v["median_steps"] is not None}
        if "hint_sd" in data["ratios_to_grpo"]:
            data["hint_sd_over_grpo"] = data["ratios_to_grpo"]["hint_sd"]
        for m, ratio in data["ratios_to_grpo"].items():
            lines.append(f"{m} / grpo median steps: {ratio:.2f}")
    return "\n".join(lines), data
