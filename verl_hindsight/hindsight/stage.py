"""The hindsight stage of one training batch: feedback -> targets -> teacher sequences -> teacher log-probs.

Input: the batch's rows (prompt/response ids, the agent loop's ``action_mask`` and records, the GRPO group
``uid``, the student's ``old_log_probs``). Output: per row, ``teacher_log_probs`` aligned to the response and a
``hindsight_mask`` that is 1 only on targeted action tokens, plus ``hindsight/*`` metrics. The teacher itself
is a *scorer* (see :mod:`.teacher_sequences`): the trainer passes verl's actor or reference log-prob pass.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field, fields
from typing import Any, Callable, Optional

from verl_hindsight.hindsight.records import Trajectory
from verl_hindsight.hindsight.teacher_sequences import (
    DEFAULT_FEEDBACK_TEMPLATE,
    FeedbackRenderer,
    TargetTurn,
    TopKScorer,
    empty_topk,
    map_back,
    map_back_topk,
    plan_teacher_sequences,
)

TEACHER_KINDS = ("frozen", "ema", "lagged", "live")
#: teacher kinds whose weights live in the worker's reference model (scored by compute_ref_log_prob)
REF_TEACHERS = ("frozen", "ema", "lagged")


@dataclass(frozen=True)
class TeacherConfig:
    """``hindsight.teacher``: which model scores the teacher sequences, and how they are built."""

    # frozen: the initial policy (verl's reference model); ema: reference weights <- lerp toward the policy after
    # every update (HINT-SD: decay 0.999); lagged: reference <- policy every sync_interval updates (SERL: 10);
    # live: the current policy (collapses in the toy study: it learns to ignore the feedback).
    kind: str = "frozen"
    mode: str = "isolated"  # "isolated" | "cumulative"
    max_length: Optional[int] = None  # default: rollout prompt_length + response_length
    overflow: str = "truncate_left"  # "truncate_left" | "skip"
    feedback_template: str = DEFAULT_FEEDBACK_TEMPLATE
    ema_decay: float = 0.999
    sync_interval: int = 10
    # collapse flag: targeted-token |gap| below this while episode success stays below collapse_success
    collapse_gap: float = 0.02
    collapse_success: float = 0.5
    log_probe: bool = False  # score a fixed probe sequence every step (hindsight/teacher_probe_logprob)
    # where the feedback goes: right before the target turn (HINT-SD), or at the start of the episode (the
    # placement ablation of HINT-SD's paper: same feedback, far from the turn it is about)
    insert_at: str = "target_turn"
    # what the KL to the reference (actor.use_kl_loss / algorithm.use_kl_in_reward) anchors to when the teacher
    # moves (ema/lagged): "initial" keeps the reference model on the initial policy and gives the teacher a copy of
    # the weights of its own (swapped in for the teacher pass only); "teacher" makes the reference model the teacher,
    # so the anchor moves with it (SERL's released code; it cost a tiny policy its output format in our demo).
    kl_anchor: str = "initial"

    def __post_init__(self):
        if self.kind not in TEACHER_KINDS:
            raise ValueError(f"hindsight.teacher.kind must be one of {TEACHER_KINDS}, got {self.kind!r}")
        if not 0.0 < self.ema_decay < 1.0:
            raise ValueError(f"hindsight.teacher.ema_decay must be in (0, 1), got {self.ema_decay!r}")
        if self.sync_interval < 1:
            raise ValueError(f"hindsight.teacher.sync_interval must be >= 1, got {self.sync_interval!r}")
        if self.insert_at not in ("target_turn", "episode_start"):
            raise ValueError(f"hindsight.teacher.insert_at must be target_turn or episode_start, got {self.insert_at!r}")
        if self.kl_anchor not in ("initial", "teacher"):
            raise ValueError(f"hindsight.teacher.kl_anchor must be initial or teacher, got {self.kl_anchor!r}")
        if self.insert_at == "episode_start" and self.mode != "isolated":
            raise ValueError("hindsight.teacher.insert_at=episode_start needs mode=isolated")
        if "{feedback}" not in self.feedback_template:
            raise ValueError("hindsight.teacher.feedback_template must contain '{feedback}'")

    @property
    def uses_reference_model(self) -> bool:
        return self.kind in REF_TEACHERS

    @property
    def moves(self) -> bool:
        """EMA and lagged teachers are updated toward the policy during training."""
        return self.kind in ("ema", "lagged")


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


def _dataclass_from(cls, block: Optional[dict]):
    block = dict(block or {})
    known = {f.name for f in fields(cls)}
    unknown = set(block) - known
    if unknown:
        raise ValueError(f"{cls.__name__}: unknown keys {sorted(unknown)}; known: {sorted(known)}")
    return cls(**block)


@dataclass(frozen=True)
class HindsightSettings:
    """The ``hindsight`` config block as the trainer sees it (the agent loops read ``env`` and ``analyzer``)."""

    enable: bool = False
    feedback: Any = None  # FeedbackConfig
    targets: Any = None  # TargetConfig
    teacher: TeacherConfig = TeacherConfig()
    distill: Any = None  # DistillConfig
    analyzer_role: str = "none"
    replay_poll_interval_s: float = 0.05
    dump_dir: Optional[str] = None  # write sampled trajectories with per-token hindsight values (the viewer's input)
    dump_rows: int = 8  # trajectories dumped per step
    # "actions": the policy-gradient advantage is zeroed outside action tokens, so reasoning/format tokens get no
    # PG update (the toy study's setting; it keeps a tiny model from losing its output format). "all": verl's way.
    advantage_tokens: str = "all"
    # stop training at the first validation with hindsight/val_success >= this (the toy study's protocol: runs end
    # at the first eval >= 0.8); null trains for trainer.total_training_steps
    stop_at_val_success: Optional[float] = None

    @classmethod
    def from_config(cls, config) -> "HindsightSettings":
        from verl_hindsight.agent_loops.hindsight_answers import AnswerSettings
        from verl_hindsight.algo.loss import DistillConfig
        from verl_hindsight.hindsight.feedback import FeedbackConfig
        from verl_hindsight.hindsight.targets import TargetConfig

        block = config.get("hindsight", None) if hasattr(config, "get") else None
        block = dict(block) if block is not None else {}
        known = {"enable", "feedback", "targets", "teacher", "distill", "analyzer", "env", "replay_poll_interval_s",
                 "dump_dir", "dump_rows", "advantage_tokens", "stop_at_val_success"}
        unknown = set(block) - known
        if unknown:
            raise ValueError(f"hindsight: unknown keys {sorted(unknown)}; known: {sorted(known)}")

        def sub(name):
            value = block.get(name)
            return dict(value) if value is not None else {}

        answers = AnswerSettings.from_config(config)
        settings = cls(
            enable=bool(block.get("enable", False)),
            feedback=_dataclass_from(FeedbackConfig, sub("feedback")),
            targets=_dataclass_from(TargetConfig, sub("targets")),
            teacher=_dataclass_from(TeacherConfig, sub("teacher")),
            distill=_dataclass_from(DistillConfig, sub("distill")),
            analyzer_role=answers.role,
            replay_poll_interval_s=float(block.get("replay_poll_interval_s", 0.05)),
            dump_dir=block.get("dump_dir"),
            dump_rows=int(block.get("dump_rows", 8)),
            advantage_tokens=str(block.get("advantage_tokens", "all")),
            stop_at_val_success=(None if block.get("stop_at_val_success") is None
                                 else float(block["stop_at_val_success"])),
        )
        settings.validate(config)
        return settings

    def validate(self, config) -> None:
        """Configs that would silently do nothing, or something else than asked, fail here with the fix."""
        if self.advantage_tokens not in ("all", "actions"):
            raise ValueError(f"hindsight.advantage_tokens must be 'all' or 'actions', got {self.advantage_tokens!r}")
        if self.stop_at_val_success is not None:
            if not 0.0 < self.stop_at_val_success <= 1.0:
                raise ValueError(f"hindsight.stop_at_val_success must be in (0, 1] or null, got "
                                 f"{self.stop_at_val_success}")
            test_freq = config.get("trainer", {}).get("test_freq", -1) if hasattr(config, "get") else -1
            if test_freq is None or int(test_freq) <= 0:
                raise ValueError("hindsight.stop_at_val_success needs validation during training: set "
                                 f"trainer.test_freq > 0 (got {test_freq})")
        algorithm = config.get("algorithm", {}) if hasattr(config, "get") else {}
        estimator = str(algorithm.get("adv_estimator", "")) if algorithm is not None else ""
        if estimator == "serl" and not self.enable:
            raise ValueError("algorithm.adv_estimator=serl needs the hindsight stage: set hindsight.enable=true "
                             "(and trainer.v1.trainer_mode=hindsight); see recipes/serl.yaml")
        if self.distill.enabled and not self.enable:
            raise ValueError("hindsight.distill.coef > 0 needs the hindsight stage: set hindsight.enable=true")
        if self.enable and estimator != "serl" and not self.distill.enabled:
            raise ValueError("hindsight.enable=true but nothing uses the teacher: set algorithm.adv_estimator=serl "
                             "(SERL) or hindsight.distill.coef > 0 (HINT-SD, HERO)")
        if self.distill.enabled and self.distill.divergence == "topk_tail":
            actor = config.get("actor_rollout_ref", {}).get("actor", {}) if hasattr(config, "get") else {}
            strategy = str(actor.get("strategy", "fsdp")) if actor is not None else "fsdp"
            if strategy not in ("fsdp", "fsdp2"):
                raise ValueError(f"hindsight.distill.divergence=topk_tail runs in the FSDP engine's logits hook; "
                                 f"actor_rollout_ref.actor.strategy={strategy} is not supported (its logits are "
                                 "vocab-sharded): use divergence=k3 there")
        source = self.feedback.source.split("+")
        if "analyzer" in source and self.analyzer_role != "analyzer":
            raise ValueError("hindsight.feedback.source=analyzer needs hindsight.analyzer.role=analyzer")
        if "reflection" in source and self.analyzer_role != "reflector":
            raise ValueError("hindsight.feedback.source=reflection needs hindsight.analyzer.role=reflector")
        if self.targets.uses_analyzer and self.analyzer_role != "analyzer":
            raise ValueError(f"hindsight.targets.turns={self.targets.turns} needs hindsight.analyzer.role=analyzer")


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


def run_stage(rows: list[Row], *, feedback_config, target_config, teacher_config: TeacherConfig,
              renderer: FeedbackRenderer, scorer: Optional[Callable[[list[list[int]]], list[list[float]]]] = None,
              judge_fn=None, analyzer_picks=None, topk_scorer: Optional[TopKScorer] = None,
              topk: int = 0) -> StageResult:
    """One batch's stage. ``scorer`` gives sampled-token teacher log-probs; ``topk_scorer`` (with ``topk``) gives
    those plus the teacher's top-k at every position, for the top-k + tail distillation loss."""
    if (scorer is None) == (topk_scorer is None):
        raise ValueError("run_stage needs exactly one of scorer / topk_scorer")
    if topk_scorer is not None and topk < 1:
        raise ValueError(f"run_stage with a topk_scorer needs topk >= 1, got {topk}")
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
        traj = trajectories[local]
        by_turn = {t.turn: t for t in traj.turns}
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

    sequences = [s.token_ids for p in plans.values() for s in p.sequences]
    start = time.perf_counter()
    topk_scores = None
    if topk_scorer is not None:
        topk_scores = topk_scorer(sequences) if sequences else []
        scores = [s.log_probs for s in topk_scores]
    else:
        scores = scorer(sequences) if sequences else []
    teacher_time = time.perf_counter() - start
    teacher_topk = None
    if topk_scorer is not None:
        teacher_topk = [empty_topk(len(r.response_ids), topk) for r in rows]

    teacher_rows = [[0.0] * len(r.response_ids) for r in rows]
    mask_rows = [[0] * len(r.response_ids) for r in rows]
    gaps: list[float] = []
    cursor = 0
    for index, plan in plans.items():
        row = rows[index]
        n = len(plan.sequences)
        scored_mask = row.action_mask if target_config.span == "action" else row.response_mask
        teacher, mask = map_back(plan, scores[cursor:cursor + n], len(row.response_ids), scored_mask)
        if teacher_topk is not None:
            teacher_topk[index] = map_back_topk(plan, topk_scores[cursor:cursor + n], len(row.response_ids), topk,
                                                scored_mask)
        cursor += n
        teacher_rows[index], mask_rows[index] = teacher, mask
        gaps += [teacher[i] - row.old_log_probs[i] for i, m in enumerate(mask) if m]

    targeted_tokens = sum(map(sum, mask_rows))
    action_tokens = sum(sum(r.action_mask) for r in rows if not r.is_padding)
    response_tokens = sum(sum(r.response_mask) if r.response_mask is not None else len(r.response_ids)
                          for r in rows if not r.is_padding)
    forwarded = sum(len(s) for s in sequences)
    metrics.update({
        "hindsight/targeted_trajectories": float(len(plans)),
        "hindsight/targeted_turns": float(sum(len(p.sequences[0].turns) if teacher_config.mode == "cumulative"
                                              else len(p.sequences) for p in plans.values() if p.sequences)),
        "hindsight/targeted_tokens": float(targeted_tokens),
        # of actions: above 1 when the targeted span is the whole message (targets.span=message)
        "hindsight/targeted_token_frac_of_actions": targeted_tokens / max(action_tokens, 1),
        "hindsight/targeted_token_frac_of_response": targeted_tokens / max(response_tokens, 1),
        "hindsight/teacher_tokens_forwarded": float(forwarded),
        "hindsight/teacher_to_student_tokens": forwarded / max(student_tokens, 1),
        "timing_s/hindsight_teacher": teacher_time,
    })
    for reason, count in skipped.items():
        metrics[f"hindsight/teacher_skipped/{reason}"] = float(count)
    if gaps:
        # Teacher-student gap on targeted tokens. Falling toward 0 while success stays low is the collapse the
        # toy study saw with a live teacher.
        ordered = sorted(gaps)
        metrics.update({
            "hindsight/gap_mean": statistics.fmean(gaps),
            "hindsight/gap_abs_mean": statistics.fmean(abs(g) for g in gaps),
            "hindsight/gap_p10": ordered[int(0.1 * (len(ordered) - 1))],
            "hindsight/gap_p50": ordered[int(0.5 * (len(ordered) - 1))],
            "hindsight/gap_p90": ordered[int(0.9 * (len(ordered) - 1))],
        })
        successes = [t.success for t in trajectories if not t.failure]
        success = sum(successes) / len(successes) if successes else 0.0
        metrics["hindsight/teacher_collapse"] = float(
            metrics["hindsight/gap_abs_mean"] < teacher_config.collapse_gap and success < teacher_config.collapse_success)
    return StageResult(teacher_rows, mask_rows, metrics, inserted, teacher_topk)
