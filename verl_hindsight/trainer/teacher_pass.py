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


def _nested(rows: list[list[int]]) -> torch.Tensor:
    return torch.nested.as_nested_tensor([torch.tensor(r, dtype=torch.int64) for r in rows], layout=torch.jagged)


def worker_scorer(call: Callable, *, temperature: float, dp_size: int = 1, micro_batch_size: int | None = None,
                  extra_meta: dict | None = None):
    """A scorer backed by a verl worker-group method (``actor_rollout_wg.compute_log_prob`` or the ref's).

    verl splits the batch evenly over data-parallel ranks and, without dynamic batch sizes, each rank's share
    into micro-batches of exactly ``micro_batch_size``: the sequences are padded to a multiple of
    ``dp_size * micro_batch_size`` with 2-token dummies (cheap), whose scores are dropped.
    """
    multiple = max(1, dp_size) * max(1, micro_batch_size or 1)
    from tensordict import TensorDict
    from verl.utils import tensordict_utils as tu
    from verl.workers.utils.padding import response_from_nested

    def score(sequences: list[list[int]]) -> list[list[float]]:
        if not sequences:
            return []
        short = [i for i, s in enumerate(sequences) if len(s) < 2]
        if short:
            raise ValueError(f"teacher sequences {short[:3]} have fewer than 2 tokens; nothing to score")
        n = len(sequences)
        padded = list(sequences) + [list(sequences[0][:2])] * ((-n) % multiple)
        response_mask = _nested([[1] * (len(s) - 1) for s in padded])
        td = TensorDict(
            {
                "input_ids": _nested(padded),
                "position_ids": _nested([list(range(len(s))) for s in padded]),
                "prompts": _nested([s[:1] for s in padded]),
                "responses": _nested([s[1:] for s in padded]),
                "response_mask": response_mask,
                "loss_mask": response_mask,
            },
            batch_size=len(padded),
        )
        tu.assign_non_tensor(td, calculate_entropy=False, compute_loss=False, temperature=temperature,
                             **(extra_meta or {}))
        out = call(td)
        log_probs = response_from_nested(out["log_probs"], response_mask)
        rows = [row.float().tolist() for row in log_probs.unbind(0)]
        return rows[:n]

    return score
