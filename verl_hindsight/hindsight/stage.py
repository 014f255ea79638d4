"""The hindsight stage of one training batch: feedback -> targets -> teacher sequences -> teacher log-probs.

Input: the batch's rows (prompt/response ids, the agent loop's ``action_mask`` and records, the GRPO group
``uid``, the student's ``old_log_probs``). Output: per row, ``teacher_log_probs`` aligned to the response and a
``hindsight_mask`` that is 1 only on targeted action tokens, plus ``hindsight/*`` metrics. The teacher itself
is a *scorer* (see :mod:`.teacher_sequences`): the trainer passes verl's actor or reference log-prob pass.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from typing import Any, Optional

from verl_hindsight.config import TeacherConfig
from verl_hindsight.hindsight.records import Trajectory
from verl_hindsight.hindsight.teacher_sequences import (
    FeedbackRenderer,
    TargetTurn,
    Scorer,
    TopKScorer,
    empty_topk,
    map_back,
    map_back_topk,
    plan_teacher_sequences,
)

@dataclass
class Row:
    uid: str
    prompt_ids: list[int]
    response_ids: list[int]
    action_mask: list[int]
    extra_fields: dict[str, Any]
    old_log_probs: list[float]
    is_padding: bool = False
    response_mask: Optional[list[int]] = None  # 1 on generated tokens; needed by targets.span=message


@dataclass
class StageResult:
    teacher_log_probs: list[list[float]]
    hindsight_mask: list[list[int]]
    metrics: dict[str, float] = field(default_factory=dict)
    # (row index, turn) -> the feedback text the teacher saw there (targeted turns only)
    inserted_feedback: dict[tuple[int, int], str] = field(default_factory=dict)
    # with a top-k scorer: per row, the teacher's top-k (ids, log-probs), each (response_len, k), zeros elsewhere
    teacher_topk: Optional[list[tuple[Any, Any]]] = None


def analyzer_picks_of(trajectories: list[Trajectory]) -> dict[int, list[int]]:
    """Turns the analyzer picked, per trajectory index (from the agent loop's ``hs_analysis``)."""
    picks = {}
    for i, traj in enumerate(trajectories):
        steps = (traj.extra.get("hs_analysis") or {}).get("steps") or []
        if steps:
            picks[i] = [int(turn) for turn, _ in steps]
    return picks


def _scored_span(row: Row, turn, span: str) -> tuple[int, int]:
    """Response positions [start, end) scored in a targeted turn: its action tokens, or its whole generated
    message (the generated run that starts the turn: observation tokens after it have response_mask 0)."""
    if span == "action":
        return turn.action_span[0], turn.action_span[1]
    if row.response_mask is None:
        raise ValueError("hindsight.targets.span=message needs each row's response_mask (the trainer passes it)")
    start = end = turn.response_span[0]
    while end < len(row.response_mask) and row.response_mask[end]:
        end += 1
    return start, max(end, turn.action_span[1])


@dataclass
class StagePlan:
    """What the teacher must score for one batch: per targeted row, its teacher sequences."""

    live: list[int]  # indices of the non-padding rows
    trajectories: list[Trajectory]  # one per live row
    plans: dict[int, Any]  # row index -> SplicePlan
    inserted: dict[tuple[int, int], str]  # (row index, turn) -> feedback text the teacher sees there
    skipped: dict[str, int]  # reason -> teacher sequences dropped (too long)
    student_tokens: int  # prompt + response tokens of the targeted rows
    metrics: dict[str, float]

    @property
    def sequences(self) -> list[list[int]]:
        return [s.token_ids for p in self.plans.values() for s in p.sequences]


@dataclass
class TeacherScores:
    log_probs: list[list[float]]  # per teacher sequence, the log-prob of each next token
    topk: Optional[list] = None  # per teacher sequence, TopKScores (top-k scorer only)
    seconds: float = 0.0


def plan_stage(rows: list[Row], *, feedback_config, target_config, teacher_config: TeacherConfig,
               renderer: FeedbackRenderer, judge_fn=None, analyzer_picks=None) -> StagePlan:
    """Feedback, targets, and the teacher sequences that put the feedback into each targeted row's context."""
    from verl_hindsight.hindsight.feedback import compute_feedback
    from verl_hindsight.hindsight.targets import select_targets, target_metrics

    live = [i for i, r in enumerate(rows) if not r.is_padding]
    trajectories = [Trajectory.from_extra_fields(rows[i].uid, rows[i].extra_fields) for i in live]
    feedback, metrics = compute_feedback(trajectories, feedback_config, judge_fn=judge_fn)
    metrics = dict(metrics)
    if analyzer_picks is None and target_config.uses_analyzer:
        analyzer_picks = analyzer_picks_of(trajectories)
    targets = select_targets(trajectories, feedback, target_config, analyzer_picks=analyzer_picks)
    metrics.update(target_metrics(targets))

    plans, student_tokens = {}, 0
    inserted: dict[tuple[int, int], str] = {}
    skipped: dict[str, int] = {}
    for local, turn_ids in targets.items():
        row = rows[live[local]]
        by_turn = {t.turn: t for t in trajectories[local].turns}
        first = min(by_turn)
        picked = [TargetTurn(t, by_turn[first if teacher_config.insert_at == "episode_start" else t].response_span[0],
                             *_scored_span(row, by_turn[t], target_config.span), feedback.get((local, t), ""))
                  for t in turn_ids if by_turn[t].action_span]
        if not picked:
            continue
        plan = plan_teacher_sequences(row.prompt_ids, row.response_ids, picked, renderer, mode=teacher_config.mode,
                                      max_length=teacher_config.max_length, overflow=teacher_config.overflow)
        for _, reason in plan.skipped:
            skipped[reason] = skipped.get(reason, 0) + 1
        plans[live[local]] = plan
        student_tokens += len(row.prompt_ids) + len(row.response_ids)
        scored = {t for seq in plan.sequences for t in seq.turns}
        inserted.update({(live[local], t.turn): t.feedback for t in picked if t.turn in scored})
    return StagePlan(live, trajectories, plans, inserted, skipped, student_tokens, metrics)


def score_teacher(plan: StagePlan, *, scorer: Optional[Scorer] = None,
                  topk_scorer: Optional[TopKScorer] = None) -> TeacherScores:
    """One teacher pass over every sequence of the plan."""
    sequences = plan.sequences
    start = time.perf_counter()
    if topk_scorer is not None:
        topk_scores = topk_scorer(sequences) if sequences else []
        return TeacherScores([s.log_probs for s in topk_scores], topk_scores, time.perf_counter() - start)
    return TeacherScores(scorer(sequences) if sequences else [], None, time.perf_counter() - start)


def map_back_rows(rows: list[Row], plan: StagePlan, scores: TeacherScores, *, span: str, topk: int = 0):
    """Per row: teacher log-probs aligned to the response, the targeted-token mask, and (top-k scorer) the
    teacher's top-k; rows the plan does not target get zeros."""
    teacher_rows = [[0.0] * len(r.response_ids) for r in rows]
    mask_rows = [[0] * len(r.response_ids) for r in rows]
    teacher_topk = [empty_topk(len(r.response_ids), topk) for r in rows] if scores.topk is not None else None
    cursor = 0
    for index, row_plan in plan.plans.items():
        row = rows[index]
        n = len(row_plan.sequences)
        scored_mask = row.action_mask if span == "action" else row.response_mask
        teacher_rows[index], mask_rows[index] = map_back(row_plan, scores.log_probs[cursor:cursor + n],
                                                         len(row.response_ids), scored_mask)
        if teacher_topk is not None:
            teacher_topk[index] = map_back_topk(row_plan, scores.topk[cursor:cursor + n], len(row.response_ids),
                                                topk, scored_mask)
        cursor += n
    return teacher_rows, mask_rows, teacher_topk


def stage_metrics(rows: list[Row], plan: StagePlan, scores: TeacherScores, teacher_rows, mask_rows,
                  teacher_config: TeacherConfig) -> dict[str, float]:
    """``hindsight/*`` metrics of one batch's stage."""
    metrics = dict(plan.metrics)
    targeted_tokens = sum(map(sum, mask_rows))
    action_tokens = sum(sum(r.action_mask) for r in rows if not r.is_padding)
    response_tokens = sum(sum(r.response_mask) if r.response_mask is not None else len(r.response_ids)
                          for r in rows if not r.is_padding)
    forwarded = sum(len(s) for s in plan.sequences)
    metrics.update({
        "hindsight/targeted_trajectories": float(len(plan.plans)),
        "hindsight/targeted_turns": float(sum(len(p.sequences[0].turns) if teacher_config.mode == "cumulative"
                                              else len(p.sequences) for p in plan.plans.values() if p.sequences)),
        "hindsight/targeted_tokens": float(targeted_tokens),
        # of actions: above 1 when the targeted span is the whole message (targets.span=message)
        "hindsight/targeted_token_frac_of_actions": targeted_tokens / max(action_tokens, 1),
        "hindsight/targeted_token_frac_of_response": targeted_tokens / max(response_tokens, 1),
        "hindsight/teacher_tokens_forwarded": float(forwarded),
        "hindsight/teacher_to_student_tokens": forwarded / max(plan.student_tokens, 1),
        "timing_s/hindsight_teacher": scores.seconds,
    })
    for reason, count in plan.skipped.items():
        metrics[f"hindsight/teacher_skipped/{reason}"] = float(count)
    gaps = [teacher[i] - rows[index].old_log_probs[i] for index in plan.plans
            for teacher, mask in [(teacher_rows[index], mask_rows[index])] for i, m in enumerate(mask) if m]
    if gaps:
        # Teacher-student gap on targeted tokens. Falling toward 0 while success stays low means the teacher no
        # longer reads the feedback (teacher collapse).
        ordered = sorted(gaps)
        metrics.update({
            "hindsight/gap_mean": statistics.fmean(gaps),
            "hindsight/gap_abs_mean": statistics.fmean(abs(g) for g in gaps),
            "hindsight/gap_p10": ordered[int(0.1 * (len(ordered) - 1))],
            "hindsight/gap_p50": ordered[int(0.5 * (len(ordered) - 1))],
            "hindsight/gap_p90": ordered[int(0.9 * (len(ordered) - 1))],
        })
        successes = [t.success for t in plan.trajectories if not t.failure]
        success = sum(successes) / len(successes) if successes else 0.0
        metrics["hindsight/teacher_collapse"] = float(
            metrics["hindsight/gap_abs_mean"] < teacher_config.collapse_gap and success < teacher_config.collapse_success)
    return metrics


def run_stage(rows: list[Row], *, feedback_config, target_config, teacher_config: TeacherConfig,
              renderer: FeedbackRenderer, scorer: Optional[Scorer] = None, judge_fn=None, analyzer_picks=None,
              topk_scorer: Optional[TopKScorer] = None, topk: int = 0) -> StageResult:
    """One batch's stage: plan, score, map back, metrics. ``scorer`` gives sampled-token teacher log-probs;
    ``topk_scorer`` (with ``topk``) gives those plus the teacher's top-k at every position, for the top-k + tail
    distillation loss."""
    if (scorer is None) == (topk_scorer is None):
        raise ValueError("run_stage needs exactly one of scorer / topk_scorer")
    if topk_scorer is not None and topk < 1:
        raise ValueError(f"run_stage with a topk_scorer needs topk >= 1, got {topk}")
    plan = plan_stage(rows, feedback_config=feedback_config, target_config=target_config,
                      teacher_config=teacher_config, renderer=renderer, judge_fn=judge_fn,
                      analyzer_picks=analyzer_picks)
    scores = score_teacher(plan, scorer=scorer, topk_scorer=topk_scorer)
    teacher_rows, mask_rows, teacher_topk = map_back_rows(rows, plan, scores, span=target_config.span, topk=topk)
    metrics = stage_metrics(rows, plan, scores, teacher_rows, mask_rows, teacher_config)
    return StageResult(teacher_rows, mask_rows, metrics, plan.inserted, teacher_topk)
