"""HINT-SD's analyzer, HERO's reflector and SERL's judge, run by the agent loop at the end of each episode.

Why here and not in the trainer: the default answering model is the policy itself through the rollout server, and
in verl's hybrid (colocated) mode the rollout replicas sleep as soon as sampling ends. At the end of an episode the
server is awake, the episode's records are complete, and the analysis runs concurrently with other episodes.
The answer is stored in ``extra_fields`` (``hs_analysis`` / ``hs_reflection`` / ``hs_judge``) and read by the
trainer's ``analyzer`` / ``reflection`` / ``judge`` feedback sources. Bad answers are counted there, never raised.

Config: the ``hindsight.analyzer`` block (:class:`AnalyzerConfig`).
"""

from __future__ import annotations

import os
from typing import Any

from verl_hindsight.config import AnalyzerConfig
from verl_hindsight.hindsight.analyzer import (
    OpenAICompatibleClient,
    RolloutServerAnswer,
    arun_analyzer,
    arun_judge,
    arun_reflector,
)
from verl_hindsight.hindsight.records import ANSWER_FIELDS, Trajectory

def answer_fn(settings: AnalyzerConfig, tokenizer, server_manager):
    if settings.client == "openai":
        key = os.environ.get(settings.api_key_env) if settings.api_key_env else None
        return OpenAICompatibleClient(settings.base_url, settings.model, api_key=key, timeout_s=settings.timeout_s,
                                      max_tokens=settings.max_tokens, temperature=settings.temperature,
                                      retries=settings.retries, retry_backoff_s=settings.retry_backoff_s)
    return RolloutServerAnswer.from_server_manager(
        tokenizer, server_manager,
        sampling_params={"temperature": settings.temperature, "top_p": settings.top_p,
                         "max_tokens": settings.max_tokens})


async def answer_episode(settings: AnalyzerConfig, fn, turns: list[dict], summary: dict) -> dict[str, Any]:
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
    if settings.role == "judge":
        summaries, metrics = await arun_judge([traj], fn, only_failed=settings.failed_only, concurrency=1,
                                              max_chars=settings.max_chars)
        return {"hs_judge": {"summary": summaries.get(0), "metrics": {k: float(v) for k, v in metrics.items()}}}
    diagnoses, metrics = await arun_reflector([traj], fn, only_failed=settings.failed_only, concurrency=1,
                                              max_chars=settings.max_chars)
    turns_out = [{"turn": int(d.turn), "necessary": bool(d.necessary), "valid": bool(d.valid),
                  "diagnosis": d.diagnosis, "corrected_action": d.corrected_action} for d in diagnoses.get(0, [])]
    return {"hs_reflection": {"turns": turns_out, "metrics": {k: float(v) for k, v in metrics.items()}}}


def answer_metrics(extra_fields: list[dict]) -> dict[str, float]:
    """Sum the per-episode analyzer/reflector/judge counters over a batch (one entry per episode)."""
    totals: dict[str, float] = {}
    for e in extra_fields:
        if not isinstance(e, dict) or not e.get("hs_last_row", True):
            continue
        for key in ANSWER_FIELDS:
            for name, value in ((e.get(key) or {}).get("metrics") or {}).items():
                totals[name] = totals.get(name, 0.0) + float(value)
    return totals
