"""``trainer.v1.trainer_mode=hindsight``: verl's synchronous V1 trainer plus the hindsight stages.

Behaves exactly like verl's ``sync`` trainer otherwise (it *is* ``PPOTrainerSync``, pinned to sync mode).
Today it adds:
- rollout accounting: after each rollout it reads the agent loops' per-turn records and action masks from
  TransferQueue and logs ``hindsight/*`` metrics (environment success, failures by reason, invalid actions,
  turns, action-token fraction) and checks that action masks never cover observation tokens;
- a responsive replay buffer: verl polls TransferQueue for finished rollouts every 2 s, a floor on every step
  that dominates small (CPU) runs; ``hindsight.replay_poll_interval_s`` (default 0.05) lowers it.
"""

from __future__ import annotations

import logging
from collections import Counter
from typing import Any

from verl.trainer.ppo.v1.trainer_base import register_trainer
from verl.trainer.ppo.v1.trainer_sync import PPOTrainerSync

logger = logging.getLogger(__name__)

TRAINER_MODE = "hindsight"
DEFAULT_POLL_INTERVAL_S = 0.05


def _rows(value) -> list:
    """TensorDict fields come back dense or jagged; give a list of 1-D tensors either way."""
    if hasattr(value, "unbind"):
        return list(value.unbind(0))
    return list(value)


def rollout_record_metrics(action_masks, response_masks, extra_fields: list[dict],
                           is_padding: list[bool] | None = None) -> dict[str, float]:
    """``hindsight/*`` metrics of one training batch (pure function; unit-tested).

    ``is_padding`` marks the synthetic rows verl appends to make the batch divisible by the data-parallel size;
    they copy a real row's extra fields and are left out.
    """
    keep = [not p for p in is_padding] if is_padding is not None else [True] * len(extra_fields)
    extra_fields = [e for e, k in zip(extra_fields, keep) if k]
    if action_masks is not None:
        action_masks = [r for r, k in zip(_rows(action_masks), keep) if k]
    response_masks = [r for r, k in zip(_rows(response_masks), keep) if k]
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
        failures = Counter(e["failure"] for e in envs if e.get("failure"))
        metrics["hindsight/env_failures"] = float(sum(failures.values()))
        for reason, count in failures.items():
            metrics[f"hindsight/env_failure/{reason}"] = float(count)
    return metrics


@register_trainer(TRAINER_MODE)
class HindsightTrainer(PPOTrainerSync):
    def _build_replay_buffer(self):
        # verl branches on `trainer_mode == "sync"` in several places; this trainer is sync in all of them.
        self.trainer_mode = "sync"
        self.parameter_sync_step = self.config.trainer.v1.get("sync", {}).get("parameter_sync_step", 1)
        replay_buffer = super()._build_replay_buffer()
        hindsight = self.config.get("hindsight", None) or {}
        replay_buffer.poll_interval = float(hindsight.get("replay_poll_interval_s", DEFAULT_POLL_INTERVAL_S))
        return replay_buffer

    def _compute_old_log_prob(self, batch, metrics: dict):
        batch = super()._compute_old_log_prob(batch, metrics)
        metrics.update(self._rollout_record_metrics(batch))
        return batch

    def _rollout_record_metrics(self, batch) -> dict[str, Any]:
        import transfer_queue as tq

        fields = ["response_mask", "extra_fields"]
        try:
            data = tq.kv_batch_get(keys=batch.keys, partition_id=batch.partition_id,
                                   select_fields=fields + ["action_mask"])
            action_masks = data["action_mask"]
        except (KeyError, RuntimeError, ValueError) as exc:
            # Reported as hindsight/rows_with_action_mask = 0, and said once in the log.
            if not getattr(self, "_warned_no_action_mask", False):
                logger.warning("hindsight trainer: the batch has no action_mask (%s); use a verl-hindsight agent "
                               "loop (agent_name=hindsight_text_env) to record action spans", exc)
                self._warned_no_action_mask = True
            data = tq.kv_batch_get(keys=batch.keys, partition_id=batch.partition_id, select_fields=fields)
            action_masks = None
        extra = data.pop("extra_fields")
        extra = extra.tolist() if hasattr(extra, "tolist") else list(extra)
        is_padding = [bool(tag.get("is_padding", False)) for tag in batch.tags]
        metrics = rollout_record_metrics(action_masks, data["response_mask"], extra, is_padding)
        if metrics.get("hindsight/action_tokens_on_observation", 0) > 0:
            bad = [(key, am.tolist(), rm.tolist()) for key, am, rm, pad in
                   zip(batch.keys, _rows(action_masks), _rows(data["response_mask"]), is_padding)
                   if not pad and int((am * (1 - rm)).sum())]
            raise RuntimeError("hindsight trainer: action_mask covers observation tokens (response_mask 0); the agent "
                               f"loop's spans are wrong. First offending row (key, action_mask, response_mask): {bad[0]}")
        return metrics


