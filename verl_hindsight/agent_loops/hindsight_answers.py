"""HINT-SD's analyzer and HERO's reflector, run by the agent loop at the end of each episode.

Why here and not in the trainer: the default answering model is the policy itself through the rollout server, and
in verl's hybrid (colocated) mode the rollout replicas sleep as soon as sampling ends. At the end of an episode the
server is awake, the episode's records are complete, and the analysis runs concurrently with other episodes.
The answer is stored in ``extra_fields`` (``hs_analysis`` / ``hs_reflection``) and read by the trainer's
``analyzer`` / ``reflection`` feedback sources. Bad answers are counted there, never raised.

Config: the ``hindsight.analyzer`` block (:class:`AnswerSettings`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, fields
from typing import Any, Optional

from verl_hindsight.hindsight.analyzer import (
    OpenAICompatibleClient,
    RolloutServerAnswer,
    arun_analyzer,
    arun_reflector,
)
from verl_hindsight.hindsight.records import Trajectory

ROLES = ("none", "analyzer", "reflector")
CLIENTS = ("policy", "openai")


@dataclass(frozen=True)
class AnswerSettings:
    role: str = "none"  # none | analyzer (HINT-SD) | reflector (HERO)
    client: str = "policy"  # policy: the rollout server; openai: any OpenAI-compatible endpoint
    base_url: Optional[str] = None
    model: Optional[str] = None
    api_key_env: Optional[str] = None  # name of the environment variable holding the API key
    k: int = 3  # analyzer: at most k steps (HINT-SD multi)
    variant: str = "multi"  # analyzer: multi | single
    only_failed: Optional[bool] = None  # default: analyzer True (HINT-SD), reflector False (HERO)
    temperature: float = 0.6
    top_p: float = 0.95
    max_tokens: int = 512
    max_chars: int = 12000
    timeout_s: float = 60.0

    def __post_init__(self):
        if self.role not in ROLES:
            raise ValueError(f"hindsight.analyzer.role must be one of {ROLES}, got {self.role!r}")
        if self.client not in CLIENTS:
            raise ValueError(f"hindsight.analyzer.client must be one of {CLIENTS}, got {self.client!r}")
        if self.client == "openai" and not (self.base_url and self.model):
            raise ValueError("hindsight.analyzer.client=openai needs base_url and model")
        if self.variant not in ("multi", "single"):
            raise ValueError(f"hindsight.analyzer.variant must be multi or single, got {self.variant!r}")

    @classmethod
    def from_config(cls, config) -> "AnswerSettings":
        hindsight = config.get("hindsight", None) if hasattr(config, "get") else None
        block = hindsight.get("analyzer", None) if hindsight is not None else None
        block = dict(block) if block is not None else {}
        known = {f.name for f in fields(cls)}
        unknown = set(block) - known
        if unknown:
            raise ValueError(f"hindsight.analyzer: unknown keys {sorted(unknown)}; known: {sorted(known)}")
        return cls(**block)

    @property
    def failed_only(self) -> bool:
        return self.only_failed if self.only_failed is not None else self.role == "analyzer"


def answer_fn(settings: AnswerSettings, tokenizer, server_manager):
    if settings.client == "openai":
        key = os.environ.get(settings.api_key_env) if settings.api_key_env else None
        return OpenAICompatibleClient(settings.base_url, settings.model, api_key=key, timeout_s=settings.timeout_s,
                                      max_tokens=settings.max_tokens, temperature=settings.temperature)
    return RolloutServerAnswer.from_server_manager(
        tokenizer, server_manager,
        sampling_params={"temperature": settings.temperature, "top_p": settings.top_p,
                         "max_tokens": settings.max_tokens})


async def answer_episode(settings: AnswerSettings, fn, turns: list[dict], summary: dict) -> dict[str, Any]:
    """``extra_fields`` entries for one finished episode (empty when the role is none)."""
    if settings.role == "none":
        return {}
    traj = Trajectory.from_extra_fields("", {"hs_turns": turns, "hs_env": summary})
    if settings.role == "analyzer":
        picks, metrics = await arun_analyzer([traj], fn, k=settings.k, variant=settings.variant,
                                             only_failed=settings.failed_only, concurrency=1,
                                             max_chars=settings.max_chars)
        steps = [[int(turn), text] for turn, text in picks.get(0, [])]
        return {"hs_analysis": {"steps": steps, "metrics": {k: float(v) for k, v in metrics.items()}}}
    diagnoses, metrics = await arun_reflector([traj], fn, only_failed=settings.failed_only, concurrency=1,
                                              max_chars=settings.max_chars)
    turns_out = [{"turn": int(d.turn), "necessary": bool(d.necessary), "valid": bool(d.valid),
                  "diagnosis": d.diagnosis, "corrected_action": d.corrected_action} for d in diagnoses.get(0, [])]
    return {"hs_reflection": {"turns": turns_out, "metrics": {k: float(v) for k, v in metrics.items()}}}


def answer_metrics(extra_fields: list[dict]) -> dict[str, float]:
    """Sum the per-episode analyzer/reflector counters over a batch (one entry per episode)."""
    totals: dict[str, float] = {}
    for e in extra_fields:
        if not isinstance(e, dict) or not e.get("hs_last_row", True):
            continue
        for key in ("hs_analysis", "hs_reflection"):
            for name, value in ((e.get(key) or {}).get("metrics") or {}).items():
                totals[name] = totals.get(name, 0.0) + float(value)
    return totals
