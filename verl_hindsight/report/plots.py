"""``curves.png``: validation success, teacher-student gap and share of action tokens distilled/reweighted per method.

Each method is drawn as the mean over its seeds (thick line) with the individual seeds as thin transparent lines. A
seed that stopped early (``hindsight.stop_at_val_success``: it reached the target) holds its last validation success
in the mean, so the mean runs to the longest seed's last step; in the other panels the mean is over the seeds still
training at that step. Methods with no data for a panel are left out of that panel. ``plot_ablation`` draws the
first two panels for a chosen set of runs (teacher kind, feedback placement), where a collapsing teacher shows up as
its gap falling to zero while validation success stays low.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Union

from verl_hindsight.report.runs import Run, load_runs

THRESHOLD = 0.8
GAP_KEY = "hindsight/gap_abs_mean"
FRACTION_KEY = "hindsight/targeted_token_frac_of_response"
MAIN_METHODS = ("grpo", "hint_sd", "serl", "hero")

# (title, key resolver); a resolver gets a Run and returns the metric key to draw for it, or None.
PANELS = (
    ("validation success", lambda run: run.val_key()),
    ("teacher-student gap: mean |log p_T - log p_S| (targeted tokens)", lambda run: _first_key(run, (GAP_KEY,))),
    ("share of response tokens the teacher targets (distilled / reweighted)",
     lambda run: _first_key(run, (FRACTION_KEY,))),
)

# The demo's ablations (``verl_hindsight.demo.run.ABLATIONS``), as label -> method (all seeds of it).
TEACHER_ABLATION = {"frozen (initial)": "hint_sd", "EMA": "hint_sd_ema", "lagged": "hint_sd_lagged",
                    "live (current policy)": "hint_sd_live"}
PLACEMENT_ABLATION = {"at the failing turn": "hint_sd", "at the episode start": "hint_sd_episode_start"}
# Issue 23's comparison (``verl_hindsight.demo.run.COMPARISON``), with the main methods as references
CREDIT_RULES = {"GRPO": "grpo", "SERL (released)": "serl", "RLSD clipped, lambda 1": "rlsd_clipped",
                "RLSD unclipped": "rlsd", "additive": "additive", "HINT-SD": "hint_sd", "HERO (env diagnosis)": "hero"}
NO_FEEDBACK = {"HINT-SD": "hint_sd", "HINT-SD, no feedback": "hint_sd_nofb", "RLSD clipped": "rlsd_clipped",
               "RLSD clipped, no feedback": "rlsd_clipped_nofb", "RLSD": "rlsd",
               "RLSD, no feedback": "rlsd_nofb", "additive": "additive", "additive, no feedback": "additive_nofb"}
SERL_ABLATION = {"SERL (clip 0.2, lambda decays)": "serl", "weight clip 1.0": "serl_clip1",
                 "constant lambda": "serl_nodecay"}


def _first_key(run: Run, keys: tuple[str, ...]) -> Optional[str]:
    present = {k for m in run.metrics for k in m}
    return next((k for k in keys if k in present), None)


def _mean_curve(series: list[tuple[list[int], list[float]]],
                hold_last: bool = False) -> tuple[list[int], list[float]]:
    """Mean over seeds at every step some seed logged. ``hold_last``: a seed that ended before a step counts with its
    last value there (a run stopped at the target keeps its success); otherwise only the seeds that logged the step
    count. A step inside a seed's range that the seed did not log is left out."""
    maps = [dict(zip(xs, ys)) for xs, ys in series if xs]
    if not maps:
        return [], []
    steps, means = [], []
    for step in sorted(set().union(*maps)):
        values = []
        for m in maps:
            last = max(m)
            if step in m:
                values.append(m[step])
            elif step > last and hold_last:
                values.append(m[last])
            elif step <= last:
                values = None  # a gap in this seed's own range: not comparable across seeds
                break
        if values:
            steps.append(step)
            means.append(sum(values) / len(values))
    return steps, means


def _draw(groups: dict[str, list[Run]], out: Path, title: str, n_panels: int = 3) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = PANELS[:n_panels]
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 4.2), squeeze=False)
    for ax, (label, resolve) in zip(axes[0], panels):
        drawn = False
        for i, (name, runs) in enumerate(groups.items()):
            colour = f"C{i % 10}"
            series = []
            for run in runs:
                key = resolve(run)
                xs, ys = run.series(key) if key else ([], [])
                if xs:
                    series.append((xs, ys))
            if not series:
                continue  # no data for this method in this panel
            for xs, ys in series if len(series) > 1 else []:
                ax.plot(xs, ys, color=colour, alpha=0.25, linewidth=0.8)
            mx, my = _mean_curve(series, hold_last=label == "validation success")
            if not mx:  # seeds logged on interleaved steps: fall back to the first seed
                mx, my = series[0]
            seeds = f" ({len(series)} seeds)" if len(series) > 1 else ""
            ax.plot(mx, my, color=colour, linewidth=2, marker="." if len(mx) <= 40 else None,
                    label=f"{name}{seeds}")
            drawn = True
        if label == "validation success":
            ax.axhline(THRESHOLD, color="grey", linestyle="--", linewidth=1, label=f"{THRESHOLD:.0%}")
            ax.set_ylim(-0.02, 1.02)
        ax.set_title(label, fontsize=9)
        ax.set_xlabel("training step")
        ax.grid(alpha=0.3)
        if drawn:
            ax.legend(fontsize=7)
        else:
            ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def _by_method(runs: list[Run]) -> dict[str, list[Run]]:
    groups: dict[str, list[Run]] = {}
    for run in sorted(runs, key=lambda r: (r.method, r.seed)):
        groups.setdefault(run.method, []).append(run)
    return groups


def plot_run(run_dir: Union[str, Path], out: Optional[Path] = None, names: Optional[list[str]] = None,
             title: str = "GRPO vs HINT-SD vs SERL (toy corridor, CPU)") -> Path:
    """``RUN_DIR/curves.png``. ``names`` picks methods; by default the main methods present (GRPO, HINT-SD, SERL,
    HERO), so ablation runs in the same folder do not crowd the comparison (see ``plot_ablation``); every method when
    none of the main ones is there."""
    runs = load_runs(Path(run_dir))
    if names is None:
        main = [r for r in runs if r.method in MAIN_METHODS]
        runs = main or runs
    else:
        runs = [r for r in runs if r.method in names]
    groups = _by_method(runs)
    order = {m: i for i, m in enumerate(MAIN_METHODS)}
    groups = dict(sorted(groups.items(), key=lambda kv: (order.get(kv[0], len(order)), kv[0])))
    return _draw(groups, Path(out) if out else Path(run_dir) / "curves.png", title)


def plot_ablation(run_dir: Union[str, Path], runs: dict[str, str], out: Union[str, Path] = "ablation.png",
                  title: str = "ablation") -> Path:
    """Validation success and teacher-student gap for ``runs`` (label -> run name). A run name is either a run folder
    (``hint_sd_live-s0``) or a method (``hint_sd_live``: all its seeds, mean + thin seeds). Labels with no run in
    the folder are left out. ``out`` is a file name inside ``run_dir`` (or an absolute path)."""
    run_dir = Path(run_dir)
    loaded = load_runs(run_dir)
    groups: dict[str, list[Run]] = {}
    for label, name in runs.items():
        chosen = [r for r in loaded if r.name == name] or [r for r in loaded if r.method == name]
        if chosen:
            groups[label] = sorted(chosen, key=lambda r: r.seed)
    out = Path(out)
    return _draw(groups, out if out.is_absolute() else run_dir / out, title, n_panels=2)


def plot_ablations(run_dir: Union[str, Path]) -> list[Path]:
    """The demo's ablation and comparison figures, each written when one of its runs beyond its references exists:
    ``ablation_teacher.png`` (frozen / EMA / lagged / live teacher), ``ablation_placement.png`` (feedback at the
    failing turn vs at the episode start), ``credit_rules.png`` (signed credit rules against the main methods),
    ``no_feedback.png`` (each no-feedback control next to its method) and ``ablation_serl.png`` (weight clip, decay)."""
    methods = {r.method for r in load_runs(Path(run_dir))}
    written = []
    # per figure, the runs drawn only as references: the figure is written when one of its other runs exists
    for name, spec, title, references in (
            ("ablation_teacher.png", TEACHER_ABLATION, "HINT-SD teacher kind (a live teacher's gap collapses to 0)",
             MAIN_METHODS),
            ("ablation_placement.png", PLACEMENT_ABLATION, "HINT-SD feedback placement", MAIN_METHODS),
            ("credit_rules.png", CREDIT_RULES, "signed credit rules (frozen teacher, lambda 1) vs the main methods",
             MAIN_METHODS),
            ("no_feedback.png", NO_FEEDBACK, "no-feedback controls: same targets, no hindsight text",
             MAIN_METHODS + ("rlsd", "additive")),
            ("ablation_serl.png", SERL_ABLATION, "SERL: weight clip and lambda decay", MAIN_METHODS)):
        if any(m in methods for m in spec.values() if m not in references):
            written.append(plot_ablation(run_dir, spec, name, title))
    return written
