"""Top-k + tail reverse KL through verl's logits-processor hook (the full-distribution HINT-SD loss).

Sampled-token estimators (k1/k3/JSD) only see the student's log-prob of the token it sampled. On a failed turn that
token is the wrong one: k3's gradient pushes it down but never pulls the teacher's answer up, and the freed mass
spreads over the whole vocabulary (on the CPU demo the tiny model lost its action format; docs/demo.md). The
full-distribution reverse KL pulls the teacher's answer up directly, which is what HINT-SD's released loss does.

verl 0.9.1 passes the student's logits to the loss only through its top-k distillation hook: when a micro-batch
carries the non-tensor flag ``distillation_use_topk``, the FSDP engine calls ``loss_fn(student_logits=(1, nnz, V),
data=micro_batch)`` once per forward, stores each returned per-token tensor in ``model_output``, then calls the loss
as usual. Both passes use it here:

- teacher pass (reference or actor worker, forward only): :func:`teacher_topk_outputs` returns the teacher's top-k
  ids and log-probs at every position (``hs_topk_id_i`` / ``hs_topk_lp_i``, one float per token each: the hook
  accepts per-token tensors only; ids are exact in fp32 below 2**24);
- student pass (actor update): :func:`student_topk_tail_kl` computes, per token, reverse KL(student || teacher) over
  the teacher's top-k ids plus one tail bucket holding each distribution's remaining mass
  (:func:`verl_hindsight.algo.divergences.topk_tail_reverse_kl`).

The released HINT-SD code takes the *student's* top-k ids and reads the teacher's logits there; verl never has the
teacher's logits in the student pass, so the ids are the teacher's (verl's own top-k distillation does the same).
Student mass outside the teacher's top-k lands in the tail bucket, whose teacher mass is small, so it is still
pushed down. Positions are aligned as verl aligns ``log_probs``: the logits at packed position ``p`` predict token
``p + 1``; the response's token ``j`` of a row is predicted at ``prompt_len - 1 + j`` of that row.

Not taken from verl 0.9.1 (``verl/trainer/distillation/fsdp/losses.py``), on purpose:

- ``compute_forward_kl_topk`` is forward KL(T || S) over the top-k with no tail bucket, clamped at 0 afterwards;
- ``_chunked_topk_log_probs`` (private) casts its result back to the logits' dtype (bf16 under mixed
  precision), so the tail bucket ``1 - sum(top-k)`` loses its precision; :func:`_chunked_gather_log_probs` keeps
  fp32;
- verl has no teacher-side top-k from logits (its teacher top-k comes from a teacher inference server).

The teacher's top-k travels in verl's own fields and layout (``teacher_ids`` / ``teacher_logprobs``, one row per
prompt + response token), so the student hook reads it exactly where verl's top-k loss would.
"""

from __future__ import annotations

import torch

from verl_hindsight.algo.divergences import topk_tail_reverse_kl

STUDENT_KL_KEY = "hs_topk_tail_kl"  # per-token model_output key written by the student hook
# per-token probability mass each side puts on the teacher's top-k ids (verl logs the same pair): near 1 for both
# on confident tokens; a student mass near 0 where the teacher is sure means misaligned positions
STUDENT_MASS_KEY, TEACHER_MASS_KEY = "hs_topk_student_mass", "hs_topk_teacher_mass"


def teacher_topk_outputs(model_output=None, data=None, dp_group=None, student_logits=None, *, k: int):
    """A verl loss function whose logits-processor call returns the top-k of the model it runs on.

    Called twice per micro-batch by the engine: with ``student_logits`` (the logits of the model being run, here
    the teacher), then as the loss (forward only: returns a zero loss and no metrics).
    """
    if student_logits is None:
        return torch.zeros(()), {}
    values, ids = _chunked_topk(student_logits, k)
    out = {}
    for i in range(k):
        out[f"hs_topk_id_{i}"] = ids[..., i].float()
        out[f"hs_topk_lp_{i}"] = values[..., i]
    return out


def _chunked_topk(logits: torch.Tensor, k: int, chunk: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k log-probs and ids of (1, N, V) logits, fp32, without materializing an fp32 (N, V) copy at once."""
    flat = logits.reshape(-1, logits.shape[-1])
    values = torch.empty((flat.shape[0], k), dtype=torch.float32, device=flat.device)
    ids = torch.empty((flat.shape[0], k), dtype=torch.long, device=flat.device)
    for s in range(0, flat.shape[0], chunk):
        part = flat[s:s + chunk].float()
        top, top_ids = torch.topk(part, k=k, dim=-1)
        values[s:s + chunk] = top - torch.logsumexp(part, dim=-1, keepdim=True)
        ids[s:s + chunk] = top_ids
    return values.reshape(*logits.shape[:-1], k), ids.reshape(*logits.shape[:-1], k)


def _chunked_gather_log_probs(logits: torch.Tensor, ids: torch.Tensor, chunk: int = 4096,
                              rows: torch.Tensor | None = None) -> torch.Tensor:
    """log_softmax(logits).gather(ids) in fp32, chunked over tokens (differentiable; as verl's top-k loss does).

    With ``rows`` (indices into the flattened tokens of ``logits``), only those tokens are computed and ``ids`` holds
    one row per entry of ``rows``. Each chunk's fp32 logits stay alive for the backward pass (logsumexp saves them),
    so selecting rows bounds that memory by the rows selected, not by all tokens; rows are selected chunk by chunk so
    no second copy of the selected logits exists at once.
    """
    flat, flat_ids = logits.reshape(-1, logits.shape[-1]), ids.reshape(-1, ids.shape[-1])
    parts = []
    # one (empty) chunk when there are no rows keeps the result attached to the logits' graph
    for s in range(0, max(flat_ids.shape[0], 1), chunk):
        part = (flat[s:s + chunk] if rows is None else flat.index_select(0, rows[s:s + chunk])).float()
        parts.append(part.gather(-1, flat_ids[s:s + chunk]) - torch.logsumexp(part, dim=-1, keepdim=True))
    return torch.cat(parts, dim=0).reshape(*ids.shape)


def stack_topk(columns: dict, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, log_probs) of shape (..., k) from the per-rank columns :func:`teacher_topk_outputs` wrote."""
    ids = torch.stack([columns[f"hs_topk_id_{i}"] for i in range(k)], dim=-1).round().long()
    lps = torch.stack([columns[f"hs_topk_lp_{i}"] for i in range(k)], dim=-1).float()
    return ids, lps


def student_topk_tail_kl(student_logits: torch.Tensor, data) -> dict[str, torch.Tensor]:
    """The student hook: per packed token, reverse KL over the teacher's top-k + tail (0 where no teacher).

    ``teacher_ids`` / ``teacher_logprobs`` are in verl's layout (one row per prompt + response token, the row before
    a token describing it), so their packed values line up with the packed logits as verl's own top-k loss uses them.
    """
    if "teacher_ids" not in data.keys() or "teacher_logprobs" not in data.keys():
        raise RuntimeError("hindsight.distill.divergence=topk_tail but the batch has no teacher_ids/teacher_logprobs: "
                           "the hindsight stage did not run (trainer.v1.trainer_mode=hindsight)")
    ids, lps = data["teacher_ids"], data["teacher_logprobs"]
    ids = (ids.values() if ids.is_nested else ids.reshape(-1, ids.shape[-1])).long()
    lps = (lps.values() if lps.is_nested else lps.reshape(-1, lps.shape[-1])).float()
    ids, lps = ids.unsqueeze(0).to(student_logits.device), lps.unsqueeze(0).to(student_logits.device)
    from verl.utils.ulysses import get_ulysses_sequence_parallel_world_size, slice_input_tensor

    if get_ulysses_sequence_parallel_world_size() > 1:  # the logits are this rank's sequence shard (as verl does)
        ids, lps = slice_input_tensor(ids, dim=1), slice_input_tensor(lps, dim=1)
    if ids.shape[:2] != student_logits.shape[:2]:
        raise RuntimeError(f"teacher top-k layout {tuple(ids.shape[:2])} does not match the student logits "
                           f"{tuple(student_logits.shape[:2])}; pad_to_length and fused kernels are not supported "
                           "with hindsight.distill.divergence=topk_tail")
    # positions without a teacher (prompt, untargeted tokens) carry all-zero log-probs, not a distribution: they get
    # KL 0 and masses 0 (the loss masks them anyway). Only targeted positions are computed, since each computed
    # position keeps a full fp32 vocabulary row alive for the backward pass (~0.6 MB at V=152k)
    has_teacher = lps.ne(0).any(dim=-1)
    rows = has_teacher.reshape(-1).nonzero().squeeze(-1)
    teacher = lps.reshape(-1, lps.shape[-1]).index_select(0, rows)
    student = _chunked_gather_log_probs(student_logits, ids.reshape(-1, ids.shape[-1]).index_select(0, rows),
                                        rows=rows)
    kl = topk_tail_reverse_kl(student, teacher)

    def scatter(values: torch.Tensor) -> torch.Tensor:  # zeros at untargeted positions, differentiable into values
        return values.new_zeros(has_teacher.numel()).index_copy(0, rows, values).reshape(has_teacher.shape)

    return {STUDENT_KL_KEY: scatter(kl),
            STUDENT_MASS_KEY: scatter(student.detach().exp().sum(-1)),
            TEACHER_MASS_KEY: scatter(teacher.exp().sum(-1))}
