"""SERL's advantage: the reward gives the direction, the self-teacher's gap gives the magnitude and placement.

Exactly the released code's rule (methods-reference A1), on the tokens where ``hindsight_mask`` is 1::

    A      = GRPO outcome advantage of the trajectory (verl's own estimator, honouring norm_adv_by_std_in_grpo)
    d_t    = teacher_log_probs_t - old_log_probs_t                      (stop-gradient: plain tensors)
    w_t    = clip(exp(clamp(sign(A) * d_t, -20, 20)), 1 - weight_clip, 1 + weight_clip)
    l_k    = mixing_lambda * max(0, 1 - global_step / lambda_decay_steps)
    A~_t   = A * ((1 - l_k) + l_k * w_t)       on hindsight tokens;   A~_t = A elsewhere

So |A~ - A| <= l_k * weight_clip * |A| everywhere, sign(A) = 0 gives A~ = A, and once l_k = 0 SERL *is* GRPO
(the trainer then skips the teacher pass). Config keys live under ``algorithm.serl``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
import torch
from verl.trainer.ppo.core_algos import compute_grpo_outcome_advantage, register_adv_est

ESTIMATOR_NAME = "serl"
ENABLE_HINT = (
    "the SERL estimator needs the hindsight stage's teacher_log_probs and hindsight_mask: run the plugin's trainer "
    "(trainer.v1.trainer_mode=hindsight) with the stage on (hindsight.enable=true), e.g. start from the recipe "
    "`recipes/cpu/toy_serl.yaml` or `recipes/serl.yaml`"
)


@dataclass(frozen=True)
class SERLConfig:
    weight_clip: float = 0.2
    mixing_lambda: float = 0.5
    lambda_decay_steps: int = 50

    def __post_init__(self):
        if not 0.0 <= self.weight_clip < 1.0:
            raise ValueError(f"algorithm.serl.weight_clip must be in [0, 1), got {self.weight_clip!r}")
        if not 0.0 <= self.mixing_lambda <= 1.0:
            raise ValueError(f"algorithm.serl.mixing_lambda must be in [0, 1], got {self.mixing_lambda!r}")
        if self.lambda_decay_steps < 1:
            raise ValueError(f"algorithm.serl.lambda_decay_steps must be >= 1, got {self.lambda_decay_steps!r}")

    @classmethod
    def from_algorithm_config(cls, config: Any) -> "SERLConfig":
        block = _get(config, "serl", None) or {}
        block = dict(block.items()) if hasattr(block, "items") else dict(block)
        known = {"weight_clip", "mixing_lambda", "lambda_decay_steps"}
        unknown = set(block) - known
        if unknown:
            raise ValueError(f"algorithm.serl: unknown keys {sorted(unknown)}; known: {sorted(known)}")
        return cls(**block)

    def mixing(self, global_step: int) -> float:
        """l_k: mixing_lambda decaying linearly to 0 at ``lambda_decay_steps`` policy updates."""
        return self.mixing_lambda * max(0.0, 1.0 - float(global_step) / float(self.lambda_decay_steps))


def _get(config: Any, key: str, default: Any) -> Any:
    if config is None:
        return default
    if hasattr(config, "get"):
        return config.get(key, default)
    return getattr(config, key, default)


def serl_weights(advantages: torch.Tensor, teacher_log_probs: torch.Tensor, old_log_probs: torch.Tensor,
                 weight_clip: float) -> torch.Tensor:
    """w_t = clip(exp(clamp(sign(A) * d_t, -20, 20)), 1 - eps, 1 + eps); computed in fp32, no gradient."""
    with torch.no_grad():
        gap = teacher_log_probs.float() - old_log_probs.float()
        signed = torch.clamp(torch.sign(advantages.float()) * gap, -20.0, 20.0)
        return torch.clamp(torch.exp(signed), 1.0 - weight_clip, 1.0 + weight_clip)


def serl_reweight(advantages: torch.Tensor, teacher_log_probs: torch.Tensor, old_log_probs: torch.Tensor,
                  hindsight_mask: torch.Tensor, mixing: float, weight_clip: float) -> tuple[torch.Tensor, dict]:
    """Apply SERL's reweighting to per-token advantages ``A`` (any estimator's); returns (A~, metrics)."""
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
def compute_serl_advantage(token_level_rewards: torch.Tensor, response_mask: torch.Tensor, index: np.ndarray,
                           config: Optional[Any] = None, teacher_log_probs: Optional[torch.Tensor] = None,
                           old_log_probs: Optional[torch.Tensor] = None,
                           hindsight_mask: Optional[torch.Tensor] = None, global_step: Optional[int] = None,
                           epsilon: float = 1e-6, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    """verl-registered SERL estimator: GRPO advantage reweighted on hindsight tokens (see module doc).

    Called through verl's stock ``compute_advantage`` (which passes only rewards, mask, index and config) it
    raises: silently training GRPO under the name SERL would be worse than failing.
    """
    missing = [name for name, value in (("teacher_log_probs", teacher_log_probs), ("old_log_probs", old_log_probs),
                                        ("hindsight_mask", hindsight_mask), ("global_step", global_step))
               if value is None]
    if missing:
        raise ValueError(f"adv_estimator=serl called without {missing}: {ENABLE_HINT}")
    serl = SERLConfig.from_algorithm_config(config)
    norm = bool(_get(config, "norm_adv_by_std_in_grpo", True))
    advantages, _ = compute_grpo_outcome_advantage(token_level_rewards, response_mask, index, epsilon=epsilon,
                                                   norm_adv_by_std_in_grpo=norm)
    mask = hindsight_mask.bool() & response_mask.bool()
    out, _ = serl_reweight(advantages, teacher_log_probs, old_log_probs, mask, serl.mixing(global_step),
                           serl.weight_clip)
    return out, out
