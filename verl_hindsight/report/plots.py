"""``curves.png``: validation success, teacher-student gap and share of tokens distilled/reweighted per method."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from verl_hindsight.report.runs import Run, load_runs

PANELS = (
    ("validation success", None),
    ("teacher-student gap |mean| (targeted tokens)", "hindsight/gap_abs_mean"),
    ("fraction of action tokens distilled / reweighted", "hindsight/targeted_token_frac_of_actions"),
)


def _draw(runs: list[Run], out: Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(PANELS), figsize=(5 * len(PANELS), 4))
    colours = {}
    for ax, (label, key) in zip(axes, PANELS):
        drawn = False
        for run in runs:
            k = run.val_key() if key is None else key
            if not k:
                continue
            xs, ys = run.series(k)
            if not xs:
                continue
            colour = colours.setdefault(run.method, f"C{len(colours)}")
            ax.plot(xs, ys, color=colour, alpha=0.85, marker="." if key is None else None,
                    label=f"{run.method} s{run.seed}")
            drawn = True
        if key is None:
            ax.axhline(0.8, color="grey", linestyle="--", linewidth=1)
            ax.set_ylim(-0.02, 1.02)
        ax.set_title(label, fontsize=10)
        ax.set_xlabel("training step")
        if drawn:
            ax.legend(fontsize=7)
        else:
            ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def plot_run(run_dir: Path, out: Optional[Path] = None, names: Optional[list[str]] = None,
             title: str = "GRPO vs HINT-SD vs SERL (toy corridor, CPU)") -> Path:
    runs = [r for r in load_runs(run_dir) if names is None or r.method in names]
    return _draw(runs, Path(out or Path(run_dir) / "curves.png"), title)
