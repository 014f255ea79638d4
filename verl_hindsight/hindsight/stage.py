"""The hindsight stage of one training batch: feedback -> targets -> teacher sequences -> teacher log-probs.

Input: the batch's rows (prompt/response ids, the agent loop's ``action_mask`` and records, the GRPO group
``uid``, the student's ``old_log_probs``), as 1-D tensors. Output: per row, the teacher's answer in verl's
distillation layout (``teacher_logprobs`` / ``teacher_ids``, see :mod:`.teacher_sequences`) and a
``hindsight_mask`` that is 1 only on targeted action tokens, plus ``hindsight/*`` metrics. The teacher itself is
a *scorer*: the trainer passes verl's actor or reference log-prob pass.

Which tokens of a targeted turn are scored comes from one source, the agent loop's token-level ``action_mask``
(or, with ``targets.span=message``, the ``response_mask``) inside the turn's message; the per-turn records say only
where each message starts and ends and whether it holds an action.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Optional

import torch

from verl_hindsight.config import TeacherConfig
from verl_hindsight.hindsight.records import Trajectory
from verl_hindsight.hindsight.teacher_sequences import (
    FeedbackRenderer,
    MappedRow,
    Scorer,
    TargetTurn,
    TopKScorer,
    empty_row,
    map_back,
    plan_teacher_sequences,
)


def _tensor(values, dtype) -> torch.Tensor:
    return torch.as_tensor(values, dtype=dtype)


@dataclass
class Row:
    uid: str
    prompt_ids: torch.Tensor  # (prompt_len,) int64
    response_ids: torch.Tensor  # (response_len,) int64
    action_mask: torch.Tensor  # (response_len,) 1 on action tokens
    extra_fields: dict[str, Any]
    old_log_probs: torch.Tensor  # (response_len,) the student's log-probs of its tokens
    is_padding: bool = False
    response_mask: Optional[torch.Tensor] = None  # 1 on generated tokens; needed by targets.span=message

    def __post_init__(self):
        self.prompt_ids = _tensor(self.prompt_ids, torch.long)
        self.response_ids = _tensor(self.response_ids, torch.long)
        self.action_mask = _tensor(self.action_mask, torch.long)
        self.old_log_probs = _tensor(self.old_log_probs, torch.float32)
        if self.response_mask is not None:
            self.response_mask = _tensor(self.response_mask, torch.long)


@dataclass
class StageResult:
    rows: list[MappedRow]  # per input row (zeros where nothing is targeted)
    metrics: dict[str, float] = field(default_factory=dict)
    # (row index, turn) -> the feedback text the teacher saw there (targeted turns only)
    inserted_feedback: dict[tuple[int, int], str] = field(default_factory=dict)


def analyzer_picks_of(trajectories: list[Trajectory]) -> dict[int, list[int]]:
    """Turns the analyzer picked, per trajectory index (from the agent loop's ``hs_analysis``)."""
    picks = {}
    for i, traj in enumerate(trajectories):
        steps = (traj.extra.get("hs_analysis") or {}).get("steps") or []
        if steps:
            picks[i] = [int(turn) for turn, _ in steps]
    return picks


def _scored_span(row: Row, turn, span: str) -> Optional[tuple[int, int]]:
    """Response positions [start, end) scored in a targeted turn: from the first to the last action token inside
    its message, or (``span=message``) its whole generated run (observation tokens after it have response_mask 0).
    None when the message holds no action token."""
    start, end = turn.response_span
    actions = torch.nonzero(row.action_mask[start:end]).flatten()
    if len(actions) == 0:
        return None
    if span == "action":
        return start + int(actions[0]), start + int(actions[-1]) + 1
    if row.response_mask is None:
        raise ValueError("hindsight.targets.span=message needs each row's response_mask (the trainer passes it)")
    off = torch.nonzero(row.response_mask[start:] == 0).flatten()
    run_end = start + (int(off[0]) if len(off) else len(row.response_mask) - start)
    return start, max(run_end, start + int(actions[-1]) + 1)


@dataclass
class StagePlan:
    """What the teacher must score for one batch: per targeted row, its teacher sequences."""

    live: list[int]  # indices of the non-padding rows
    trajectories: list[Trajectory]  # one per live row
    plans: dict[int, Any]  # row index -> SplicePlan
    # (row index, turn) -> feedback text the teacher sees there ("" under teacher.insert_feedback=false)
    inserted: dict[tuple[int, int], str]
    skipped: dict[str, int]  # reason -> teacher sequences dropped (too long)
    student_tokens: int  # prompt + response tokens of the targeted rows
    metrics: dict[str, float]

    @property
    def sequences(self) -> list[torch.Tensor]:
        return [s.token_ids for p in self.plans.values() for s in p.sequences]


@dataclass
class TeacherScores:
    per_sequence: list  # per teacher sequence: (n-1,) log-probs, or TopKScores from a top-k scorer
    k: int = 1  # columns of the teacher's answer (1: the sampled token; else the top-k width)
    seconds: float = 0.0


def plan_stage(rows: list[Row], *, feedback_config, target_config, teacher_config: TeacherConfig,
               renderer: FeedbackRenderer, analyzer_picks=None) -> StagePlan:
    """Feedback, targets, and the teacher sequences that put the feedback into each targeted row's context."""
    from verl_hindsight.hindsight.feedback import compute_feedback
    from verl_hindsight.hindsight.targets import select_targets, target_metrics

    live = [i for i, r in enumerate(rows) if not r.is_padding]
    trajectories = [Trajectory.from_extra_fields(rows[i].uid, rows[i].extra_fields) for i in live]
    feedback, metrics = compute_feedback(trajectories, feedback_config)
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
        spans = {t: _scored_span(row, by_turn[t], target_config.span) for t in turn_ids}
        picked = [TargetTurn(t, by_turn[first if teacher_config.insert_at == "episode_start" else t].response_span[0],
                             *spans[t], feedback.get((local, t), "")) for t in turn_ids if spans[t] is not None]
        if not picked:
            continue
        plan = plan_teacher_sequences(row.prompt_ids, row.response_ids, picked, renderer, mode=teacher_config.mode,
                                      max_length=teacher_config.max_length, overflow=teacher_config.overflow,
                                      insert_feedback=teacher_config.insert_feedback)
        for _, reason in plan.skipped:
            skipped[reason] = skipped.get(reason, 0) + 1
        plans[live[local]] = plan
        student_tokens += len(row.prompt_ids) + len(row.response_ids)
        scored = {t for seq in plan.sequences for t in seq.turns}
        inserted.update({(live[local], t.turn): t.feedback if teacher_config.insert_feedback else ""
                         for t in picked if t.turn in scored})
    return StagePlan(live, trajectories, plans, inserted, skipped, student_tokens, metrics)


def score_teacher(plan: StagePlan, *, scorer: Optional[Scorer] = None, topk_scorer: Optional[TopKScorer] = None,
                  topk: int = 0) -> TeacherScores:
    """One teacher pass over every sequence of the plan."""
    sequences = plan.sequences
    start = time.perf_counter()
    if topk_scorer is not None:
        scores = topk_scorer(sequences) if sequences else []
        return TeacherScores(scores, topk, time.perf_counter() - start)
    return TeacherScores(scorer(sequences) if sequences else [], 1, time.perf_counter() - start)


def map_back_rows(rows: list[Row], plan: StagePlan, scores: TeacherScores, *, span: str) -> list[MappedRow]:
    """Per row, the teacher's answer mapped onto its tokens; rows the plan does not target get zeros."""
    mapped = [empty_row(len(r.prompt_ids), len(r.response_ids), scores.k) for r in rows]
    cursor = 0
    for index, row_plan in plan.plans.items():
        row = rows[index]
        n = len(row_plan.sequences)
        mapped[index] = map_back(row_plan, scores.per_sequence[cursor:cursor + n], row.prompt_ids, row.response_ids,
                                 row.action_mask if span == "action" else row.response_mask, k=scores.k)
        cursor += n
    return mapped


def stage_metrics(rows: list[Row], plan: StagePlan, scores: TeacherScores, mapped: list[MappedRow],
                  teacher_config: TeacherConfig) -> dict[str, float]:
    """``hindsight/*`` metrics of one batch's stage."""
    metrics = dict(plan.metrics)
    live = [i for i, r in enumerate(rows) if not r.is_padding]
    targeted_tokens = sum(int(m.hindsight_mask.sum()) for m in mapped)
    action_tokens = sum(int(rows[i].action_mask.sum()) for i in live)
    response_tokens = sum(int(rows[i].response_mask.sum()) if rows[i].response_mask is not None
                          else len(rows[i].response_ids) for i in live)
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
    gaps = [(m.sampled_log_probs - rows[i].old_log_probs)[m.hindsight_mask.bool()] for i, m in enumerate(mapped)
            if i in plan.plans]
    gaps = torch.cat(gaps) if gaps else torch.zeros(0)
    if len(gaps):
        # Teacher-student gap on targeted tokens. Falling toward 0 while success stays low means the teacher no
        # longer reads the feedback (teacher collapse).
        ordered = gaps.double().sort().values
        metrics.update({
            "hindsight/gap_mean": float(gaps.double().mean()),
            "hindsight/gap_abs_mean": float(gaps.double().abs().mean()),
            "hindsight/gap_p10": float(ordered[int(0.1 * (len(ordered) - 1))]),
            "hindsight/gap_p50": float(ordered[int(0.5 * (len(ordered) - 1))]),
            "hindsight/gap_p90": float(ordered[int(0.9 * (len(ordered) - 1))]),
        })
        successes = [t.success for t in plan.trajectories if not t.failure]
        success = sum(successes) / len(successes) if successes else 0.0
        metrics["hindsight/teacher_collapse"] = float(
            metrics["hindsight/gap_abs_mean"] < teacher_config.collapse_gap and success < teacher_config.collapse_success)
    return metrics


def run_stage(rows: list[Row], *, feedback_config, target_config, teacher_config: TeacherConfig,
              renderer: FeedbackRenderer, scorer: Optional[Scorer] = None, analyzer_picks=None,
              topk_scorer: Optional[TopKScorer] = None, topk: int = 0) -> StageResult:
    """One batch's stage: plan, score, map back, metrics. ``scorer`` gives sampled-token teacher log-probs;
    ``topk_scorer`` (with ``topk``) the teacher's top-k at every position instead, for the top-k + tail
    distillation loss."""
    if (scorer is None) == (topk_scorer is None):
        raise ValueError("run_stage needs exactly one of scorer / topk_scorer")
    if topk_scorer is not None and topk < 1:
        raise ValueError(f"run_stage with a topk_scorer needs topk >= 1, got {topk}")
    plan = plan_stage(rows, feedback_config=feedback_config, target_config=target_config,
                      teacher_config=teacher_config, renderer=renderer,
                      analyzer_picks=analyzer_picks)
    scores = score_teacher(plan, scorer=scorer, topk_scorer=topk_scorer, topk=topk)
    mapped = map_back_rows(rows, plan, scores, span=target_config.span)
    metrics = stage_metrics(rows, plan, scores, mapped, teacher_config)
    return StageResult(mapped, metrics, plan.inserted)
