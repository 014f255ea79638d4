"""What the agent loops recorded, as ``hindsight/*`` metrics of each training batch: environment success and
return, failures by reason, invalid actions, turns, episodes cut by the token or turn budget, and the share of
response tokens that are action tokens (with a check that action masks never cover observation tokens)."""

from __future__ import annotations

import logging
from collections import Counter
from typing import Any

from verl_hindsight.trainer import batch_io as io

logger = logging.getLogger(__name__)

_warned_no_action_mask = False


def rollout_record_metrics(action_masks, response_masks, extra_fields: list[dict],
                           is_padding: list[bool] | None = None) -> dict[str, float]:
    """``hindsight/*`` metrics of one training batch (pure function; unit-tested).

    ``is_padding`` marks the synthetic rows verl appends to make the batch divisible by the data-parallel size;
    they copy a real row's extra fields and are left out.
    """
    keep = [not p for p in is_padding] if is_padding is not None else [True] * len(extra_fields)
    extra_fields = [e for e, k in zip(extra_fields, keep) if k]
    if action_masks is not None:
        action_masks = [r for r, k in zip(io.rows(action_masks), keep) if k]
    response_masks = [r for r, k in zip(io.rows(response_masks), keep) if k]
    n = len(extra_fields)
    metrics: dict[str, float] = {"hindsight/rows": float(n)}
    with_turns = [e for e in extra_fields if isinstance(e, dict) and "hs_turns" in e]
    metrics["hindsight/rows_with_turn_records"] = len(with_turns) / max(n, 1)
    if action_masks is None:
        metrics["hindsight/rows_with_action_mask"] = 0.0
        return metrics
    action_tokens = response_tokens = leaked = 0
    for am, rm in zip(action_masks, response_masks):
        am, rm = am.long(), rm.long()
        action_tokens += int(am.sum())
        response_tokens += int(rm.sum())
        leaked += int((am * (1 - rm)).sum())
    metrics["hindsight/rows_with_action_mask"] = 1.0
    metrics["hindsight/action_token_frac"] = action_tokens / max(response_tokens, 1)
    metrics["hindsight/action_tokens_on_observation"] = float(leaked)
    # one summary per episode: in history mode an episode spans several rows, only its last row counts
    envs = [e["hs_env"] for e in with_turns if "hs_env" in e and e.get("hs_last_row", True)]
    if envs:
        metrics["hindsight/env_success"] = sum(bool(e["success"]) for e in envs) / len(envs)
        metrics["hindsight/env_return"] = sum(float(e["return"]) for e in envs) / len(envs)
        metrics["hindsight/turns_mean"] = sum(int(e["turns"]) for e in envs) / len(envs)
        turns = sum(int(e["turns"]) for e in envs)
        metrics["hindsight/invalid_action_rate"] = sum(int(e["invalid_actions"]) for e in envs) / max(turns, 1)
        for reason in ("response_length", "max_turns"):
            metrics[f"hindsight/episode_cut/{reason}"] = sum(e.get("cut") == reason for e in envs) / len(envs)
        _warn_budget_cuts(metrics["hindsight/episode_cut/response_length"])
        failures = Counter(e["failure"] for e in envs if e.get("failure"))
        metrics["hindsight/env_failures"] = float(sum(failures.values()))
        for reason, count in failures.items():
            metrics[f"hindsight/env_failure/{reason}"] = float(count)
    return metrics


_budget_warned = False


def _warn_budget_cuts(fraction: float) -> None:
    """Say once per process when episodes run out of response tokens: their return holds only the steps taken,
    so a budget too small for a whole episode silently caps success."""
    global _budget_warned
    if fraction > 0 and not _budget_warned:
        _budget_warned = True
        logger.warning("%.0f%% of this step's episodes ended because the response ran out of tokens before the "
                       "environment ended them (hindsight/episode_cut/response_length); their return counts only "
                       "the steps taken. Raise data.max_response_length (or lower hindsight.env.max_turns) if "
                       "whole episodes should fit.", 100 * fraction)


def batch_rollout_metrics(batch, stage_enabled: bool) -> dict[str, Any]:
    """``hindsight/*`` metrics of the batch's rollouts, read from TransferQueue; raises when the agent loop's action
    masks are missing while the stage needs them, or cover observation tokens."""
    global _warned_no_action_mask
    fields = ["response_mask", "extra_fields"]
    try:
        data = io.get(batch, fields + ["action_mask"])
        action_masks = data["action_mask"]
    except (KeyError, RuntimeError, ValueError) as exc:
        # Reported as hindsight/rows_with_action_mask = 0, and said once in the log.
        if not _warned_no_action_mask:
            logger.warning("hindsight trainer: the batch has no action_mask (%s); use a verl-hindsight agent "
                           "loop (agent_name=hindsight_text_env) to record action spans", exc)
            _warned_no_action_mask = True
        if stage_enabled:
            raise RuntimeError("hindsight.enable=true needs action spans: use a verl-hindsight agent loop "
                               "(hindsight_text_env / hindsight_tool_env)") from exc
        data = io.get(batch, fields)
        action_masks = None
    extra, padding = io.objects(data, "extra_fields"), io.is_padding(batch)
    metrics = rollout_record_metrics(action_masks, data["response_mask"], extra, padding)
    if metrics.get("hindsight/action_tokens_on_observation", 0) > 0:
        bad = [(key, am.tolist(), rm.tolist()) for key, am, rm, pad in
               zip(batch.keys, io.rows(action_masks), io.rows(data["response_mask"]), padding)
               if not pad and int((am * (1 - rm)).sum())]
        raise RuntimeError("hindsight trainer: action_mask covers observation tokens (response_mask 0); the agent "
                           f"loop's spans are wrong. First offending row (key, action_mask, response_mask): {bad[0]}")
    return metrics
