"""Which turns the self-teacher distils (SERL: every action turn with feedback; HINT-SD: analyzer-picked steps
of failed episodes).

Only action tokens are ever targeted: a turn without an action (``TurnRecord.has_action``) cannot be picked, and
within a picked turn only positions where the agent loop's ``action_mask`` is 1 count (reasoning and format tokens
keep plain RL).
Trajectories whose environment failed are never targeted: their records are not trustworthy.
"""

from __future__ import annotations

from typing import Optional

from verl_hindsight.config import TargetConfig
from verl_hindsight.hindsight.records import Trajectory


def eligible(traj: Trajectory, config: TargetConfig) -> bool:
    """Whether a trajectory may be targeted at all under ``config``."""
    if traj.failure:
        return False
    return config.trajectories == "all" or not traj.success


def _analyzer_turns(picks: list[int], candidates: list[int], limit: int) -> list[int]:
    """The ``limit`` earliest analyzer picks that are real action turns (duplicates and stray indices ignored)."""
    return sorted(set(picks) & set(candidates))[:limit]


def select_targets(trajectories: list[Trajectory], feedback: dict[tuple[int, int], str], config: TargetConfig,
                   analyzer_picks: Optional[dict[int, list[int]]] = None) -> dict[int, list[int]]:
    """Trajectory index -> sorted turn indices to distil; trajectories with nothing selected are left out."""
    if config.uses_analyzer and analyzer_picks is None:
        raise ValueError(f"hindsight target turns={config.turns!r} needs analyzer_picks")
    targets: dict[int, list[int]] = {}
    for i, traj in enumerate(trajectories):
        if not eligible(traj, config):
            continue
        candidates = sorted(t.turn for t in traj.turns if t.has_action)
        if config.turns == "all":
            chosen = candidates
        elif config.turns == "with_feedback":
            chosen = [t for t in candidates if feedback.get((i, t))]
        else:
            limit = 1 if config.turns == "analyzer_first" else config.k
            chosen = _analyzer_turns(analyzer_picks.get(i) or [], candidates, limit)
        if chosen:
            targets[i] = chosen
    return targets


def target_metrics(targets: dict[int, list[int]]) -> dict[str, float]:
    """How many trajectories/turns were selected, and where in the episode the selected turns sit.

    Named ``selected_*`` because the stage reports ``targeted_*`` after teacher planning may skip some.
    """
    hist: dict[int, int] = {}
    for turns in targets.values():
        for t in turns:
            hist[t] = hist.get(t, 0) + 1
    metrics = {
        "hindsight/selected_trajectories": float(len(targets)),
        "hindsight/selected_turns": float(sum(len(v) for v in targets.values())),
    }
    metrics.update({f"hindsight/target_turn_hist/{t}": float(n) for t, n in sorted(hist.items())})
    return metrics
