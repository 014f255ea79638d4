"""Teacher log-probs through verl's own worker log-prob passes (the GPU-ready path of the teacher).

The trainer scores spliced teacher sequences with the actor (current policy) or the reference worker (frozen
initial policy) exactly as verl scores rollouts: a TensorDict of jagged ``input_ids``/``position_ids`` with
``prompts``/``responses``/``response_mask``, sent to ``compute_log_prob`` / ``compute_ref_log_prob``. Each
sequence is presented as a one-token prompt and the rest as the response, so the returned response log-probs
are ``log p(x_j | x_<j)`` for every j >= 1 — the scorer contract of
:mod:`verl_hindsight.hindsight.teacher_sequences`. The same code runs on GPUs (FSDP/Megatron workers) and on
the CPU runtime.
"""

from __future__ import annotations

from typing import Callable

import torch


def _nested(rows: list[torch.Tensor]) -> torch.Tensor:
    return torch.nested.as_nested_tensor([torch.as_tensor(r, dtype=torch.int64) for r in rows], layout=torch.jagged)


def _batch(sequences: list[torch.Tensor], multiple: int, meta: dict):
    """The scoring TensorDict (padded with 2-token dummies to ``multiple`` rows) and its response mask."""
    from tensordict import TensorDict
    from verl.utils import tensordict_utils as tu

    short = [i for i, s in enumerate(sequences) if len(s) < 2]
    if short:
        raise ValueError(f"teacher sequences {short[:3]} have fewer than 2 tokens; nothing to score")
    padded = list(sequences) + [sequences[0][:2]] * ((-len(sequences)) % multiple)
    response_mask = _nested([torch.ones(len(s) - 1) for s in padded])
    td = TensorDict(
        {
            "input_ids": _nested(padded),
            "position_ids": _nested([torch.arange(len(s)) for s in padded]),
            "prompts": _nested([s[:1] for s in padded]),
            "responses": _nested([s[1:] for s in padded]),
            "response_mask": response_mask,
            "loss_mask": response_mask,
        },
        batch_size=len(padded),
    )
    tu.assign_non_tensor(td, calculate_entropy=False, **meta)
    return td, response_mask


def worker_scorer(call: Callable, *, temperature: float, dp_size: int = 1, micro_batch_size: int | None = None,
                  extra_meta: dict | None = None):
    """A scorer backed by a verl worker-group method (``actor_rollout_wg.compute_log_prob`` or the ref's).

    verl splits the batch evenly over data-parallel ranks and, without dynamic batch sizes, each rank's share
    into micro-batches of exactly ``micro_batch_size``: the sequences are padded to a multiple of
    ``dp_size * micro_batch_size`` with 2-token dummies (cheap), whose scores are dropped.
    """
    multiple = max(1, dp_size) * max(1, micro_batch_size or 1)
    from verl.workers.utils.padding import response_from_nested

    def score(sequences: list[torch.Tensor]) -> list[torch.Tensor]:
        if not sequences:
            return []
        td, response_mask = _batch(sequences, multiple, dict(compute_loss=False, temperature=temperature,
                                                             **(extra_meta or {})))
        out = call(td)
        log_probs = response_from_nested(out["log_probs"], response_mask)
        return [row.float() for row in log_probs.unbind(0)][:len(sequences)]

    return score


def worker_topk_scorer(call: Callable, *, k: int, temperature: float, dp_size: int = 1,
                       micro_batch_size: int | None = None, extra_meta: dict | None = None):
    """Like :func:`worker_scorer`, through ``hs_compute_ref_topk`` / ``hs_compute_actor_topk``: each sequence's
    sampled-token log-probs plus the teacher's top-k ids and log-probs at every position."""
    multiple = max(1, dp_size) * max(1, micro_batch_size or 1)
    from verl.workers.utils.padding import response_from_nested

    from verl_hindsight.algo.topk_distill import stack_topk
    from verl_hindsight.hindsight.teacher_sequences import TopKScores

    def score(sequences: list[torch.Tensor]) -> list[TopKScores]:
        if not sequences:
            return []
        td, response_mask = _batch(sequences, multiple, dict(temperature=temperature, hs_topk=k,
                                                             **(extra_meta or {})))
        out = call(td)
        columns = {}
        for name in out.keys():
            if name.startswith("hs_topk_") or name == "log_probs":
                column = response_from_nested(out[name], response_mask)
                columns[name] = column.to_padded_tensor(0.0) if column.is_nested else column
        ids, lps = stack_topk(columns, k)
        lengths = [len(s) - 1 for s in sequences]
        return [TopKScores(columns["log_probs"][i, :n].float(), ids[i, :n], lps[i, :n])
                for i, n in enumerate(lengths)]

    return score


def teacher_scorer(actor_rollout_ref, teacher, wg, *, ref_in_actor: bool, topk: int = 0):
    """The scorer for ``hindsight.teacher`` on the worker group ``wg``.

    frozen/EMA/lagged teachers are the reference model (``compute_ref_log_prob``); with LoRA, where verl keeps the
    reference inside the actor, they are the actor: with its adapter switched off (frozen: the base model), or with
    the teacher adapter swapped into it (EMA/lagged, :class:`.teacher_weights.TeacherWeights`). The live teacher is
    the actor. ``topk > 0`` picks the hindsight worker's top-k variant of the same pass (``topk_tail`` loss).
    """
    return _pass(actor_rollout_ref, wg, on_ref=teacher.uses_reference_model and not ref_in_actor,
                 adapter_off=ref_in_actor and teacher.kind == "frozen", topk=topk)


def reference_scorer(actor_rollout_ref, wg, *, ref_in_actor: bool):
    """The KL anchor's scorer: the reference model, or with LoRA the actor with its adapter off (verl's own
    reference pass under LoRA)."""
    return _pass(actor_rollout_ref, wg, on_ref=not ref_in_actor, adapter_off=ref_in_actor, topk=0)


def _pass(actor_rollout_ref, wg, *, on_ref: bool, adapter_off: bool, topk: int):
    block = actor_rollout_ref.ref if on_ref else actor_rollout_ref.rollout
    micro = None if block.get("log_prob_use_dynamic_bsz", False) else block.get("log_prob_micro_batch_size_per_gpu")
    kwargs = dict(temperature=actor_rollout_ref.rollout.temperature, dp_size=wg.world_size, micro_batch_size=micro,
                  extra_meta={"no_lora_adapter": True} if adapter_off else None)
    if topk:
        return worker_topk_scorer(wg.hs_compute_ref_topk if on_ref else wg.hs_compute_actor_topk, k=topk, **kwargs)
    return worker_scorer(wg.compute_ref_log_prob if on_ref else wg.compute_log_prob, **kwargs)
