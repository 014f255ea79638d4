"""Per-token student-teacher divergences for hindsight distillation (HINT-SD, HERO), in the style of TRL's losses.

All functions take *log-probabilities* and return a per-token tensor; the teacher is always detached
(stop-gradient), so gradients flow only through the student. Everything is computed in fp32: in bf16,
``exp(d) - d - 1`` cancels to exactly 0 for the small gaps distillation works with.

Sampled-token estimators (``s = log pi_S(a_t)``, ``t = log pi_T(a_t)``, with ``a_t`` sampled from the student) —
each has expectation under the student equal to the divergence it names:

- ``k1``:  s - t                                   ->  KL(S || T)  (reverse KL; unbiased, high variance)
- ``k3``:  exp(t - s) - (t - s) - 1                ->  KL(S || T)  (Schulman's low-variance estimator, >= 0)
- ``jsd``: beta * (s - m) + (1 - beta) * exp(t - s) * (t - m),  m = log(beta e^s + (1 - beta) e^t)
                                                   ->  beta KL(S || M) + (1 - beta) KL(T || M),  M = beta S + (1-beta) T
  (the generalized Jensen-Shannon divergence; the teacher term is importance-weighted onto student samples).

Full-distribution form (HINT-SD's released loss): reverse KL over the student's top-k tokens plus one "tail" bucket
holding the remaining mass of each distribution (:func:`topk_tail_reverse_kl`).

What verl 0.9.1 computes is called, not copied (same values and gradients, checked in ``tests/unit``):

- ``k1`` is ``verl.trainer.ppo.core_algos.kl_penalty(s, t, "k1")`` (``logprob - ref_logprob``: the student is
  verl's policy, the teacher its fixed reference);
- the last step of :func:`topk_tail_reverse_kl` is ``verl.trainer.distillation.fsdp.losses.kl_divergence``.

Kept here, because verl's version differs or is missing:

- ``k3``: verl's ``low_var_kl``/``k3`` clamps the estimate to [-10, 10], which zeroes the gradient once the teacher
  gives a token ~14x the student's probability (``t - s`` > ~2.6) -- the very tokens hindsight distillation targets;
- ``jsd``: verl has no generalized JSD estimator;
- the top-k + tail bucket: verl's ``forward_kl_topk`` is forward KL(T || S) over the teacher's top-k with no tail
  bucket (and clamps negative values to 0).
"""

from __future__ import annotations

import torch
from verl.trainer.distillation.fsdp.losses import kl_divergence as _verl_kl_divergence
from verl.trainer.ppo.core_algos import kl_penalty as _verl_kl_penalty

SAMPLED_DIVERGENCES = ("k1", "k3", "jsd")


def _prep(student: torch.Tensor, teacher: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return student.float(), teacher.detach().float()


def k1(student_log_probs: torch.Tensor, teacher_log_probs: torch.Tensor) -> torch.Tensor:
    s, t = _prep(student_log_probs, teacher_log_probs)
    return _verl_kl_penalty(s, t, "k1")  # s - t


def k3(student_log_probs: torch.Tensor, teacher_log_probs: torch.Tensor) -> torch.Tensor:
    s, t = _prep(student_log_probs, teacher_log_probs)
    # verl's kl_penalty(s, t, "k3") is this plus a clamp of the result to [-10, 10] (zero gradient past it), so
    # it is not used. The log-ratio clamp (as in verl) keeps one wildly off token from overflowing exp().
    r = torch.clamp(t - s, -20.0, 20.0)
    return torch.exp(r) - r - 1.0


def jsd(student_log_probs: torch.Tensor, teacher_log_probs: torch.Tensor, beta: float = 0.5) -> torch.Tensor:
    # no verl equivalent (verl's estimators are kl/k1, abs, mse/k2, low_var_kl/k3 of KL(policy || ref))
    if not 0.0 < beta < 1.0:
        raise ValueError(f"generalized JSD needs 0 < beta < 1, got {beta!r}")
    s, t = _prep(student_log_probs, teacher_log_probs)
    log_beta = torch.log(torch.tensor(beta, dtype=s.dtype, device=s.device))
    log_1m_beta = torch.log(torch.tensor(1.0 - beta, dtype=s.dtype, device=s.device))
    m = torch.logaddexp(log_beta + s, log_1m_beta + t)
    ratio = torch.exp(torch.clamp(t - s, -20.0, 20.0))
    return beta * (s - m) + (1.0 - beta) * ratio * (t - m)


def sampled_divergence(name: str, student_log_probs: torch.Tensor, teacher_log_probs: torch.Tensor,
                       jsd_beta: float = 0.5) -> torch.Tensor:
    if name == "k1":
        return k1(student_log_probs, teacher_log_probs)
    if name == "k3":
        return k3(student_log_probs, teacher_log_probs)
    if name == "jsd":
        return jsd(student_log_probs, teacher_log_probs, jsd_beta)
    raise ValueError(f"unknown divergence {name!r}; choose one of {SAMPLED_DIVERGENCES} (or topk_tail with full "
                     "logits)")


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x <= 0, numerically stable."""
    x = torch.clamp(x, max=-1e-7)
    return torch.where(x > -0.6931, torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def topk_tail_reverse_kl(student_topk_log_probs: torch.Tensor, teacher_log_probs_on_topk: torch.Tensor) -> torch.Tensor:
    """Reverse KL(S || T) over the student's top-k tokens plus one tail bucket, per position.

    ``student_topk_log_probs``: (..., k) the student's log-probs of its k most likely tokens (full-vocab
    normalized); ``teacher_log_probs_on_topk``: (..., k) the teacher's log-probs of the *same* token ids. The tail
    bucket holds 1 - sum(top-k) of each distribution, so the result is the KL between two (k+1)-way distributions
    (a lower bound on the full KL, exact when k covers the vocabulary).
    """
    s, t = _prep(student_topk_log_probs, teacher_log_probs_on_topk)
    s_tail = _log1mexp(torch.logsumexp(s, dim=-1))
    t_tail = _log1mexp(torch.logsumexp(t, dim=-1))
    s_all = torch.cat([s, s_tail.unsqueeze(-1)], dim=-1)
    t_all = torch.cat([t, t_tail.unsqueeze(-1)], dim=-1)
    return _verl_kl_divergence(log_q=t_all, log_p=s_all)  # sum exp(s_all) * (s_all - t_all): KL(S || T)
