"""SERL's advantage step: the reward gives the direction, the self-teacher's gap gives the magnitude and placement.

On the tokens where ``hindsight_mask`` is 1 (settings: ``algorithm.serl``, :class:`verl_hindsight.config.SERLConfig`)
the base advantage is replaced by a credit rule's, mixed in with weight ``l_k``::

    A      = the base estimator's advantage (a verl estimator, algorithm.serl.base_estimator; default grpo)
    d_t    = clamp(teacher_log_probs_t - old_log_probs_t, -20, 20)      (stop-gradient: plain tensors)
    l_k    = mixing_lambda * max(0, 1 - k / lambda_decay_steps)        (k: policy updates done; constant when
                                                                         lambda_decay_steps is null)
    A~_t   = (1 - l_k) * A + l_k * C_t(A, d_t)   on hindsight tokens;  A~_t = A elsewhere

with the credit ``C_t`` of ``algorithm.serl.credit_rule``:

    serl      C = A * clip(exp(sign(A) * d_t), 1 - weight_clip, 1 + weight_clip)   (the released rule)
    rlsd      C = A * exp(sign(A) * d_t)                                         (no clip)
    additive  C = A + additive_beta * d_t                                        (the sign can flip)

For ``serl`` and ``rlsd`` the credit is A times a positive weight, so sign(A~) = sign(A) on every token (A = 0 stays
0); ``serl`` also bounds |A~ - A| <= l_k * weight_clip * |A|. ``additive`` adds the teacher's gap, so a token whose
|l_k * additive_beta * d_t| exceeds |A| gets the opposite sign, and a token of a zero-advantage group gets credit
l_k * additive_beta * d_t. Every rule gives A~ = A once l_k = 0: SERL then *is* its base estimator (the trainer
skips the teacher pass). Each rule's function below says where it comes from and what here is not from its source.

``algorithm.adv_estimator=serl`` selects :func:`compute_serl_advantage` through verl's estimator registry; the
hindsight trainer looks it up there and calls it with the stage's per-token fields, so the registered function is
the code that trains.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import numpy as np
import torch
from verl.trainer.ppo.core_algos import get_adv_estimator_fn, register_adv_est

from verl_hindsight.config import SERLConfig, load_serl_config

ESTIMATOR_NAME = "serl"
ENABLE_HINT = (
    "the SERL estimator needs the hindsight stage's teacher_log_probs and hindsight_mask: run the plugin's trainer "
    "(trainer.v1.trainer_mode=hindsight) with the stage on (hindsight.enable=true), e.g. start from the recipe "
    "`recipes/cpu/toy_serl.yaml` or `recipes/serl.yaml`"
)
# past +-20 nats a gap says nothing more and exp() overflows fp32; clamping d_t or sign(A) * d_t gives the same bits
_GAP_CLAMP = 20.0


def teacher_gap(teacher_log_probs: torch.Tensor, old_log_probs: torch.Tensor) -> torch.Tensor:
    """d_t = teacher - old log-prob, clamped to +-20; fp32, no gradient. All (bs, response_length)."""
    with torch.no_grad():
        return torch.clamp(teacher_log_probs.float() - old_log_probs.float(), -_GAP_CLAMP, _GAP_CLAMP)


def serl_weights(advantages: torch.Tensor, teacher_log_probs: torch.Tensor, old_log_probs: torch.Tensor,
                 weight_clip: float) -> torch.Tensor:
    """w_t = clip(exp(clamp(sign(A) * d_t, -20, 20)), 1 - eps, 1 + eps); computed in fp32, no gradient.

    All tensors (bs, response_length)."""
    return _clipped_weights(advantages, teacher_gap(teacher_log_probs, old_log_probs), weight_clip)


def _clipped_weights(advantages: torch.Tensor, gap: torch.Tensor, weight_clip: float) -> torch.Tensor:
    with torch.no_grad():
        return torch.clamp(torch.exp(torch.sign(advantages.float()) * gap), 1.0 - weight_clip, 1.0 + weight_clip)


def _multiplicative(advantages: torch.Tensor, weights: torch.Tensor, mask: torch.Tensor,
                    mixing: float) -> torch.Tensor:
    """A * ((1 - l) + l * w) on masked tokens, A elsewhere."""
    factor = torch.where(mask, (1.0 - mixing) + mixing * weights, torch.ones_like(weights))
    return advantages * factor.to(advantages.dtype)


def serl_credit(advantages: torch.Tensor, gap: torch.Tensor, mask: torch.Tensor, mixing: float,
                serl: SERLConfig) -> tuple[torch.Tensor, dict]:
    """``credit_rule=serl``, the released rule: A * ((1 - l) + l * clip(exp(sign(A) d_t), 1 - eps, 1 + eps)).

    Source: SERL, arXiv 2605.19447 (the rule and its defaults eps 0.2, lambda 0.5 decaying to 0 over 50 updates).
    The same clipped weight at l = 1 is RLSD's rule as implementations citing arXiv 2604.03128 restate it. The sign
    never flips. ``gap``: :func:`teacher_gap`; tensors (bs, response_length)."""
    weights = _clipped_weights(advantages, gap, serl.weight_clip)
    out = _multiplicative(advantages, weights, mask, mixing)
    if not mask.any():
        return out, {}
    w = weights[mask]
    return out, {
        "serl/weight_mean": float(w.mean()),
        "serl/weight_at_upper_clip_frac": float((w >= 1.0 + serl.weight_clip - 1e-6).float().mean()),
        "serl/weight_at_lower_clip_frac": float((w <= 1.0 - serl.weight_clip + 1e-6).float().mean()),
        "serl/reweighted_token_frac": float((((1.0 - mixing) + mixing * w) != 1.0).float().mean()),
    }


def rlsd_credit(advantages: torch.Tensor, gap: torch.Tensor, mask: torch.Tensor, mixing: float,
                serl: SERLConfig) -> tuple[torch.Tensor, dict]:
    """``credit_rule=rlsd``: A * ((1 - l) + l * exp(sign(A) d_t)), the evidence ratio (p_T / p_S)^sign(A) unclipped.

    Source: RLSD, "Self-Distilled RLVR", arXiv 2604.03128: the reward sets the direction, w_t = exp(sign(A) d_t)
    the per-token magnitude. Not from the paper: implementations citing it (and summaries of it) clip w_t to
    [1 - eps_w, 1 + eps_w], which is ``credit_rule=serl`` at mixing_lambda 1; this rule is the unclipped weight that
    issue 23's comparison asks for, bounded only by the numerical clamp of d_t to +-20, and mixed with l like SERL.
    The sign never flips; the magnitude is unbounded. ``gap``: :func:`teacher_gap`; tensors (bs, response_length)."""
    weights = torch.exp(torch.sign(advantages.float()) * gap)
    out = _multiplicative(advantages, weights, mask, mixing)
    if not mask.any():
        return out, {}
    w = weights[mask]
    return out, {"serl/weight_mean": float(w.mean()), "serl/weight_max": float(w.max()),
                 "serl/weight_above_2_frac": float((w > 2.0).float().mean())}


def additive_credit(advantages: torch.Tensor, gap: torch.Tensor, mask: torch.Tensor, mixing: float,
                    serl: SERLConfig) -> tuple[torch.Tensor, dict]:
    """``credit_rule=additive``: A + l * beta * d_t, the teacher's gap added to the outcome's advantage.

    Sources: on-policy distillation as a dense per-token reward log p_T - log p_S in KL-regularised RL (G-OPD /
    ExOPD, arXiv 2602.12125, where a reward scale > 1 extrapolates past the teacher), and OPID, arXiv 2606.26790:
    A_OPID = A_episode + w * (log pi_old(y | h, skill) - log pi_old(y | h)), neither clipped nor normalised (its
    released ALFWorld script: w = 1e-3 on a mean-centred A). Not from either: the mixing weight l, applied as
    (1 - l) A + l (A + beta d_t) = A + l beta d_t so that SERL's schedule, and the trainer's "l = 0: no teacher
    pass", hold for this rule too; the clamp of d_t to +-20; the teacher and targeted tokens (the stage's). The sign
    flips where l beta |d_t| > |A| against A; a token with A = 0 gets l beta d_t. ``gap``: :func:`teacher_gap`;
    tensors (bs, response_length)."""
    term = torch.where(mask, mixing * serl.additive_beta * gap, torch.zeros_like(gap))
    out = advantages + term.to(advantages.dtype)
    return out, ({"serl/additive_term_abs_mean": float(term[mask].abs().mean())} if mask.any() else {})


CreditRule = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, float, SERLConfig], tuple[torch.Tensor, dict]]
CREDIT_RULES: dict[str, CreditRule] = {"serl": serl_credit, "rlsd": rlsd_credit, "additive": additive_credit}


def apply_credit_rule(advantages: torch.Tensor, teacher_log_probs: torch.Tensor, old_log_probs: torch.Tensor,
                      hindsight_mask: torch.Tensor, mixing: float, serl: SERLConfig) -> tuple[torch.Tensor, dict]:
    """``serl.credit_rule`` applied to per-token advantages ``A`` on ``hindsight_mask`` with mixing weight
    ``mixing``; returns (A~, metrics). All tensors (bs, response_length).

    ``serl/sign_flipped_frac``: of the masked tokens, the share whose A~ has the sign opposite to A's (0 for ``serl``
    and ``rlsd`` by construction; a token with A = 0 never counts)."""
    if advantages.shape != teacher_log_probs.shape or advantages.shape != hindsight_mask.shape:
        raise ValueError(f"serl: advantages {tuple(advantages.shape)}, teacher_log_probs "
                         f"{tuple(teacher_log_probs.shape)} and hindsight_mask {tuple(hindsight_mask.shape)} "
                         "must have the same shape")
    mask = hindsight_mask.bool()
    gap = teacher_gap(teacher_log_probs, old_log_probs)
    with torch.no_grad():
        out, metrics = CREDIT_RULES[serl.credit_rule](advantages, gap, mask, mixing, serl)
    n = int(mask.sum())
    metrics.update({"serl/lambda": float(mixing), "serl/hindsight_tokens": float(n)})
    if n:
        metrics["serl/sign_flipped_frac"] = float(((out * advantages < 0) & mask).sum()) / n
    return out, metrics


def serl_reweight(advantages: torch.Tensor, teacher_log_probs: torch.Tensor, old_log_probs: torch.Tensor,
                  hindsight_mask: torch.Tensor, mixing: float, weight_clip: float) -> tuple[torch.Tensor, dict]:
    """The released rule (``credit_rule=serl``) on per-token advantages ``A`` (bs, response_length); (A~, metrics)."""
    return apply_credit_rule(advantages, teacher_log_probs, old_log_probs, hindsight_mask, mixing,
                             SERLConfig(weight_clip=weight_clip))


@register_adv_est(ESTIMATOR_NAME)
def compute_serl_advantage(token_level_rewards: torch.Tensor, response_mask: torch.Tensor,
                           index: Optional[np.ndarray] = None, config: Optional[Any] = None, *,
                           teacher_log_probs: Optional[torch.Tensor] = None,
                           old_log_probs: Optional[torch.Tensor] = None,
                           hindsight_mask: Optional[torch.Tensor] = None, updates_done: Optional[int] = None,
                           base_advantages: Optional[torch.Tensor] = None, metrics: Optional[dict] = None,
                           **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    """verl-registered SERL estimator: the base estimator's advantage with ``algorithm.serl.credit_rule``'s credit
    mixed in on hindsight tokens.

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
    out, serl_metrics = apply_credit_rule(base_advantages, teacher_log_probs, old_log_probs, mask,
                                          serl.mixing(updates_done), serl)
    if metrics is not None:
        changed = (out != base_advantages) & response_mask.bool()
        serl_metrics["serl/changed_tokens"] = float(changed.sum())
        serl_metrics["serl/changed_tokens_outside_hindsight_mask"] = float((changed & ~mask).sum())
        metrics.update(serl_metrics)
    return out, out
