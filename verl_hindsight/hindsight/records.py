"""Typed views of what the agent loops record per trajectory (``extra_fields["hs_turns"]`` / ``["hs_env"]``).

Every later stage (feedback sources, target selection, analyzer, teacher sequences) reads these, never the raw
dicts, so the record format is defined in one place: :func:`verl_hindsight.agent_loops.env_loop.turn_record`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional


ANSWER_FIELDS = ("hs_analysis", "hs_reflection", "hs_judge")


@dataclass(frozen=True)
class TurnRecord:
    turn: int
    response_span: tuple[int, int]  # [start, end) response positions of the whole assistant message
    # whether the message holds action tokens; *which* tokens are the action is the row's ``action_mask``
    has_action: bool
    action: Optional[str]  # the parsed action (None when malformed)
    observation: str  # what the agent saw before acting
    anchor: str  # raw observation before the action: the anchor-level grouping key
    feedback: str  # the environment's immediate answer: its error if any, else the next observation
    error: Optional[str]  # the environment's complaint about the action, if any
    next_observation: str
    reward: float
    done: bool
    invalid_action: bool
    truncated: bool = False
    parse_error: Optional[str] = None
    flags: tuple[str, ...] = ()

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TurnRecord":
        return cls(
            turn=int(d["turn"]),
            response_span=tuple(d["response_span"]),
            has_action=bool(d.get("has_action", False)),
            action=d.get("action"),
            observation=d.get("observation", ""),
            anchor=d.get("anchor") or d.get("observation", ""),
            feedback=d.get("feedback") or "",
            error=d.get("error"),
            next_observation=d.get("next_observation", ""),
            reward=float(d.get("reward", 0.0)),
            done=bool(d.get("done", False)),
            invalid_action=bool(d.get("invalid_action", False)),
            truncated=bool(d.get("truncated", False)),
            parse_error=d.get("parse_error"),
            flags=tuple(d.get("flags") or ()),
        )


@dataclass(frozen=True)
class Trajectory:
    """One rollout: its GRPO group (``uid``), its turns and its outcome."""

    uid: str
    turns: tuple[TurnRecord, ...]
    success: bool
    episode_return: float
    task_id: str = ""
    env: str = ""
    failure: str = ""  # non-empty when the environment failed: such trajectories get no hindsight
    key: str = ""  # the TransferQueue row key, when known
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_extra_fields(cls, uid: str, extra_fields: dict[str, Any], key: str = "") -> "Trajectory":
        env = extra_fields.get("hs_env") or {}
        return cls(
            uid=str(uid),
            turns=tuple(TurnRecord.from_dict(t) for t in extra_fields.get("hs_turns") or ()),
            success=bool(env.get("success", False)),
            episode_return=float(env.get("return", 0.0)),
            task_id=str(env.get("task_id", "")),
            env=str(env.get("env", "")),
            failure=str(env.get("failure", "") or ""),
            key=key,
            # what the agent loop's analyzer/reflector said about this episode (see agent_loops.hindsight_answers)
            extra={k: extra_fields[k] for k in ANSWER_FIELDS if extra_fields.get(k) is not None},
        )


def group_by_uid(trajectories: list[Trajectory]) -> dict[str, list[int]]:
    """Indices of the trajectories of each GRPO group, in input order."""
    groups: dict[str, list[int]] = {}
    for i, t in enumerate(trajectories):
        groups.setdefault(t.uid, []).append(i)
    return groups
