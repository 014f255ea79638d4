"""SERL's advantage: the reward gives the direction, the self-teacher's gap gives the magnitude and placement.

The released rule, on the tokens where ``hindsight_mask`` is 1 (settings: ``algorithm.serl``,
:class:`verl_hindsight.config.SERLConfig`)::

    A      = the base estimator's advantage (a verl estimator, algorithm.serl.base_estimator; default grpo)
    d_t    = teacher_log_probs_t - old_log_probs_t                      (stop-gradient: plain tensors)
    w_t    = clip(exp(clamp(sign(A) * d_t, -20, 20)), 1 - weight_clip, 1 + weight_clip)
    l_k    = mixing_lambda * max(0, 1 - k / lambda_decay_steps)        (k: policy updates done)
    A~_t   = A * ((1 - l_k) + l_k * w_t)       on hindsight tokens;   A~_t = A elsewhere

So |A~ - A| <= l_k * weight_clip * |A| everywhere, sign(A) = 0 gives A~ = A, and once l_k = 0 SERL *is* its base
estimator (the trainer then skips the teacher pass).

``algorithm.adv_estimator=serl`` selects :func:`compute_serl_advantage` through verl's estimator registry; the
hindsight trainer looks it up there and calls it with the stage's per-token fields, so the registered function is
the code that trains.
"""

from __future__ import annotations

from typing import Any, Optional

import numpy as np
import torch
from verl.trainer.ppo.core_algos import get_adv_estimator_fn, register_adv_est

from verl_hindsight.config import load_serl_config

ESTIMATOR_NAME = "serl"
ENABLE_HINT = (
    "the SERL estimator needs the hindsight stage's teacher_log_probs and hindsight_mask: run the plugin's trainer "
    "(trainer.v1.trainer_mode=hindsight) with the stage on (hindsight.enable=true), e.g. start from the recipe "
    "`recipes/cpu/toy_serl.yaml` or `recipes/serl.yaml`"
)


def serl_weights(advantages: torch.Tensor, teacher_log_probs: torch.Tensor, old_log_probs: torch.Tensor,
                 weight_clip: float) -> torch.Tensor:
    """w_t = clip(exp(clamp(sign(A) * d_t, -20, 20)), 1 - eps, 1 + eps); computed in fp32, no gradient.

    All tensors (bs, response_length)."""
    with torch.no_grad():
        gap = teacher_log_probs.float() - old_log_probs.float()
        signed = torch.clamp(torch.sign(advantages.float()) * gap, -20.0, 20.0)
        return torch.clamp(torch.exp(signed), 1.0 - weight_clip, 1.0 + weight_clip)


def serl_reweight(advantages: torch.Tensor, teacher_log_probs: torch.Tensor, old_log_probs: torch.Tensor,
                  hindsight_mask: torch.Tensor, mixing: float, weight_clip: float) -> tuple[torch.Tensor, dict]:
    """Apply SERL's reweighting to per-token advantages ``A`` (bs, response_length); returns (A~, metrics)."""
    if advantages.shape != teacher_log_probs.shape or advantages.shape != hindsight_mask.shape:
        raise ValueError(f"serl: advantages {tuple(advantages.shape)}, teacher_log_probs "
                         f"{tuple(teacher_log_probs.shape)} and hindsight_mask {tuple(hindsight_mask.shape)} "
                         "must have the same shape")
    mask = hindsight_mask.bool()
    weights = serl_weights(advantages, teacher_log_probs, old_log_probs, weight_clip)
    factor = torch.where(mask, (1.0 - mixing) + mixing * weights, torch.ones_like(weights))
    out = advantages * factor.to(advantages.dtype)
    n = int(mask.sum())
    metrics = {"serl/lambda": float(mixing), "serl/hindsight_tokens": float(n)}
    if n:
        w = weights[mask]
        metrics.update({
            "serl/weight_mean": float(w.mean()),
            "serl/weight_at_upper_clip_frac": float((w >= 1.0 + weight_clip - 1e-6).float().mean()),
            "serl/weight_at_lower_clip_frac": float((w <= 1.0 - weight_clip + 1e-6).float().mean()),
            "serl/reweighted_token_frac": float((factor[mask] != 1.0).float().mean()),
        })
    return out, metrics


@register_adv_est(ESTIMATOR_NAME)
def compute_serl_advantage(token_level_rewards: torch.Tensor, response_mask: torch.Tensor,
                           index: Optional[np.ndarray] = None, config: Optional[Any] = None, *,
                           teacher_log_probs: Optional[torch.Tensor] = None,
                           old_log_probs: Optional[torch.Tensor] = None,
                           hindsight_mask: Optional[torch.Tensor] = None, updates_done: Optional[int] = None,
                           base_advantages: Optional[torch.Tensor] = None, metrics: Optional[dict] = None,
                           **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    """verl-registered SERL estimator: the base estimator's advantage reweighted on hindsight tokens.

    Args:
        token_level_rewards, response_mask: (bs, response_length), as for every verl estimator.
        index: (bs,) group ids (``uid``).
        config: ``algorithm`` (reads ``algorithm.serl``, and the base estimator's own keys).
        teacher_log_probs, old_log_probs, hindsight_mask: (bs, response_length), from the hindsight stage.
        updates_done: policy updates completed before this step (SERL's k).
        base_advantages: (bs, response_length) when the caller already ran the base estimator (the hindsight
            trainer runs it through verl's own advantage step, which broadcasts GRPO over multi-row episodes);
            otherwise the base estimator is looked up in verl's registry and run here on the same inputs.
        metrics: a dict to receive ``serl/*`` metrics.

    Returns:
        (advantages, returns), both (bs, response_length).

    Called through verl's stock ``compute_advantage`` (which passes only rewards, mask, index and config) it
    raises: silently training the base estimator under the name SERL would be worse than failing.
    """
    missing = [name for name, value in (("teacher_log_probs", teacher_log_probs), ("old_log_probs", old_log_probs),
                                        ("hindsight_mask", hindsight_mask), ("updates_done", updates_done))
               if value is None]
    if missing:
        raise ValueError(f"adv_estimator=serl called without {missing}: {ENABLE_HINT}")
    serl = load_serl_config(config)
    if base_advantages is None:
        base_fn = get_adv_estimator_fn(serl.base_estimator)
        base_kwargs = {"index": index} if index is not None else {}
        if serl.base_estimator == "grpo":  # verl's compute_advantage passes this to GRPO alone, from the config
            base_kwargs["norm_adv_by_std_in_grpo"] = bool((config or {}).get("norm_adv_by_std_in_grpo", True))
        base_advantages, _ = base_fn(token_level_rewards=token_level_rewards, response_mask=response_mask,
                                     config=config, **base_kwargs)
    mask = hindsight_mask.bool() & response_mask.bool()
    out, serl_metrics = serl_reweight(base_advantages, teacher_log_probs, old_log_probs, mask,
                                      serl.mixing(updates_done), serl.weight_clip)
    if metrics is not None:
        changed = (out != base_advantages) & response_mask.bool()
        serl_metrics["serl/changed_tokens"] = float(changed.sum())
        serl_metrics["serl/changed_tokens_outside_hindsight_mask"] = float((changed & ~mask).sum())
        metrics.update(serl_metrics)
    return out, out
