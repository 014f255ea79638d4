"""verl's hybrid actor/rollout/ref worker plus the self-teacher's weight updates and their checkpoint.

The teacher of the ``frozen``, ``ema`` and ``lagged`` kinds is scored by the worker's *reference* model: verl
already builds it (same architecture and sharding as the actor, forward-only, optionally CPU-offloaded) and scores
with it through ``compute_ref_log_prob``. A moving (EMA/lagged) teacher in a run that also anchors the policy with a
KL to the reference must not move that anchor, so its weights can live in a copy of their own (``hs_init_teacher_copy``)
that ``hs_swap_teacher`` exchanges with the reference weights for the teacher pass only. This subclass adds what
verl has no method for:

- ``hs_init_teacher_copy(adapter)``: a copy of the reference shards on this rank (same device and dtype), from then on
  the teacher's weights; the reference model keeps the KL anchor. With ``adapter`` (LoRA, where verl keeps the
  reference inside the actor as the base with the adapter off) the copy is of the actor's trainable tensors, the
  adapter: the teacher is a second adapter on the same base;
- ``hs_swap_teacher()``: exchange the reference shards (with ``adapter``: the actor's adapter) with that copy, shard
  by shard (called in pairs around the teacher pass, so between passes the reference model always holds the anchor
  and the actor the trained adapter);
- ``hs_update_teacher(mix)``: teacher <- (1 - mix) * teacher + mix * actor, shard by shard on every rank
  (``mix = 1`` copies: the lagged teacher's sync; ``mix = 1 - decay``: one EMA step); the teacher is the copy if
  there is one, else the reference model itself;
- ``hs_save_teacher(dir)`` / ``hs_load_teacher(dir)``: the teacher weights of this rank, so an EMA or lagged
  teacher survives a resume (verl saves only the actor);
- ``hs_teacher_checksum()``: a cheap fingerprint of the teacher weights, for tests and logs;
- ``hs_install_distill_loss(distill)``: wraps the actor loss verl built (``ppo_loss`` bound to the worker's own
  ``ActorConfig``) with the hindsight distillation term;
- ``hs_compute_ref_topk`` / ``hs_compute_actor_topk``: the teacher's top-k log-probs at every position, through the
  same forward pass as ``compute_ref_log_prob`` / ``compute_log_prob`` and verl's top-k logits hook
  (:mod:`verl_hindsight.algo.topk_distill`);
- ``update_actor``: verl's, with the micro-batches flagged ``distillation_use_topk`` when the distillation term is
  the top-k + tail reverse KL (the trainer's own flag follows verl's ``distillation`` block, which is off here);
- ``actor_worker_cls``: verl's training worker with the distillation loss's per-mini-batch normaliser
  (:class:`HindsightTrainingWorker`).

Selected by the hindsight trainer in place of ``ActorRolloutRefWorker`` (``_init_resource_pool_mgr``), the way verl
itself picks worker classes; nothing in verl is patched.
"""

from __future__ import annotations

import os
from functools import partial

import torch
from verl.single_controller.base.decorator import Dispatch, make_nd_compute_dataproto_dispatch_fn, register
from verl.utils import tensordict_utils as tu
from verl.workers.engine_workers import ActorRolloutRefWorker, TrainingWorker


def _local(t: torch.Tensor) -> torch.Tensor:
    """The shard this rank holds (FSDP2 parameters are DTensors)."""
    return t.to_local() if hasattr(t, "to_local") else t


class HindsightTrainingWorker(TrainingWorker):
    """verl's training worker plus the distillation loss's normaliser: per PPO mini-batch, the targeted tokens over
    all data-parallel ranks (``hindsight_num_targets``), counted where and as verl counts ``batch_num_tokens``."""

    @register(dispatch_mode=make_nd_compute_dataproto_dispatch_fn(mesh_name="train"), blocking=False)
    def train_batch(self, data):
        if "hindsight_mask" in data.keys():
            from verl.utils.device import get_device_id

            from verl_hindsight.algo.loss import NUM_TARGETS_KEY, targeted_tokens

            count = targeted_tokens(data).to(get_device_id())
            torch.distributed.all_reduce(count, op=torch.distributed.ReduceOp.SUM,
                                         group=self.engine.get_data_parallel_group())
            tu.assign_non_tensor(data, **{NUM_TARGETS_KEY: int(count.item())})
        return super().train_batch(data)


class HindsightActorRolloutRefWorker(ActorRolloutRefWorker):
    actor_worker_cls = HindsightTrainingWorker

    def _teacher_pairs(self):
        """(name, actor parameter, teacher tensor) on this rank: the teacher copy's tensor if there is one, else the
        reference parameter."""
        copy = getattr(self, "_hs_teacher_copy", None)
        return [(name, a, r if copy is None else copy[name]) for name, a, r in self._slots()]

    def _slots(self):
        """(name, actor parameter, slot parameter): the slot is where the teacher pass reads the teacher's weights,
        the reference model's parameter, or under LoRA the actor's own adapter parameter."""
        if getattr(self, "_hs_teacher_in_adapter", False):
            return self._adapter_pairs()
        return self._actor_ref_pairs()

    def _adapter_pairs(self):
        if self.actor is None:
            raise RuntimeError(f"the LoRA teacher adapter needs the actor in this worker (role {self.role!r})")
        adapter = [(name, p, p) for name, p in sorted(self.actor.engine.module.named_parameters()) if p.requires_grad]
        if not adapter:
            raise RuntimeError("LoRA is on but the actor has no trainable parameters to copy as the teacher adapter")
        return adapter

    def _actor_ref_pairs(self):
        if self.actor is None or self.ref is None:
            raise RuntimeError("the hindsight teacher needs both the actor and the reference model in this worker "
                               f"(role {self.role!r}); use a hybrid actor_rollout_ref worker")
        actor = dict(self.actor.engine.module.named_parameters())
        ref = dict(self.ref.engine.module.named_parameters())
        if actor.keys() != ref.keys():
            missing = sorted(set(actor) ^ set(ref))[:5]
            raise RuntimeError(f"actor and reference models differ in parameters (e.g. {missing}); the EMA/lagged "
                               "teacher needs the same architecture and wrapping for both")
        return [(name, actor[name], ref[name]) for name in sorted(actor)]

    @register(dispatch_mode=Dispatch.ONE_TO_ALL)
    def hs_install_distill_loss(self, distill) -> None:
        """Wrap the actor's PPO loss with the hindsight distillation term, keeping verl's own ActorConfig."""
        from verl.workers.utils.losses import ppo_loss

        from verl_hindsight.algo.loss import hindsight_ppo_loss

        base = self.loss_fn
        if getattr(base, "func", None) is not ppo_loss:
            raise RuntimeError("hindsight.distill cannot be combined with verl's own distillation loss "
                               "(distillation.enabled); turn one of them off")
        self.loss_fn = partial(hindsight_ppo_loss, config=base.keywords["config"], distill=distill)
        self.actor.set_loss_fn(self.loss_fn)
        self._hs_topk_student = distill.divergence == "topk_tail"

    @register(dispatch_mode=make_nd_compute_dataproto_dispatch_fn(mesh_name="actor"))
    def update_actor(self, data):
        if getattr(self, "_hs_topk_student", False):
            tu.assign_non_tensor(data, distillation_use_topk=True)
        return super().update_actor(data)

    def _topk_pass(self, worker, data, k: int):
        """One forward of ``worker`` (actor or ref TrainingWorker) returning the top-k columns instead of losses."""
        from verl_hindsight.algo.topk_distill import teacher_topk_outputs

        if worker is None:
            raise RuntimeError(f"this worker (role {self.role!r}) has no model for the teacher's top-k pass")
        if getattr(worker.engine_config, "use_fused_kernels", False):
            raise RuntimeError("hindsight.distill.divergence=topk_tail needs the logits (fused kernels never "
                               "materialize them): set actor_rollout_ref.model.use_fused_kernels=false")
        saved = worker.loss_fn
        worker.set_loss_fn(partial(teacher_topk_outputs, k=k))
        try:
            tu.assign_non_tensor(data, compute_loss=True, distillation_use_topk=True)
            output = worker.infer_batch(data)
        finally:
            worker.set_loss_fn(saved)
        return output.cpu() if output is not None else None

    @register(dispatch_mode=make_nd_compute_dataproto_dispatch_fn(mesh_name="ref"))
    def hs_compute_ref_topk(self, data):
        """The reference model's (frozen/EMA/lagged teacher's) top-k log-probs; ``k`` rides in the batch."""
        return self._topk_pass(self.ref, data, int(tu.get_non_tensor_data(data, "hs_topk", 8)))

    @register(dispatch_mode=make_nd_compute_dataproto_dispatch_fn(mesh_name="actor"))
    def hs_compute_actor_topk(self, data):
        """The current policy's (live teacher's) top-k log-probs."""
        return self._topk_pass(self.actor, data, int(tu.get_non_tensor_data(data, "hs_topk", 8)))

    @register(dispatch_mode=Dispatch.ONE_TO_ALL)
    def hs_init_teacher_copy(self, adapter: bool = False) -> int:
        """Give the teacher weights of its own, starting from the reference model's (``adapter``: from the actor's
        LoRA adapter); returns the bytes of the copy on this rank."""
        if getattr(self, "_hs_teacher_copy", None) is not None:
            raise RuntimeError("the teacher already has its own copy of the weights")
        self._hs_teacher_in_adapter = adapter
        with torch.no_grad():
            self._hs_teacher_copy = {name: _local(r.data).detach().clone() for name, _, r in self._slots()}
        return sum(t.numel() * t.element_size() for t in self._hs_teacher_copy.values())

    @register(dispatch_mode=Dispatch.ONE_TO_ALL)
    def hs_swap_teacher(self) -> None:
        """Exchange the slot's weights (reference model or actor adapter) with the teacher copy (a second call swaps
        them back)."""
        copy = getattr(self, "_hs_teacher_copy", None)
        if copy is None:
            raise RuntimeError("hs_swap_teacher needs hs_init_teacher_copy first")
        with torch.no_grad():
            for name, _, r in self._slots():
                r_local, t = _local(r.data), copy[name]
                held = r_local.clone()
                r_local.copy_(t.to(device=r_local.device))
                t.copy_(held.to(device=t.device))

    @register(dispatch_mode=Dispatch.ONE_TO_ALL)
    def hs_update_teacher(self, mix: float) -> float:
        """teacher <- teacher + mix * (actor - teacher); returns the mean absolute change (fp32) on this rank."""
        if not 0.0 < mix <= 1.0:
            raise ValueError(f"teacher update mix must be in (0, 1], got {mix}")
        change, count = 0.0, 0
        with torch.no_grad():
            for _, a, r in self._teacher_pairs():
                a_local, r_local = _local(a.data), _local(r.data)
                src = a_local.to(device=r_local.device, dtype=torch.float32)
                dst = r_local.float()
                delta = (src - dst) * mix
                change += float(delta.abs().sum())
                count += delta.numel()
                # mix 1 is the lagged teacher's sync: an exact copy (dst + (src - dst) can be off by an ulp)
                r_local.copy_((src if mix == 1.0 else dst + delta).to(r_local.dtype))
        return change / max(count, 1)

    @register(dispatch_mode=Dispatch.ONE_TO_ALL)
    def hs_save_teacher(self, directory: str) -> str:
        os.makedirs(directory, exist_ok=True)
        state = {name: _local(r.data).detach().cpu().clone() for name, _, r in self._teacher_pairs()}
        path = os.path.join(directory, f"teacher_rank{self.rank}.pt")
        torch.save(state, path)
        return path

    @register(dispatch_mode=Dispatch.ONE_TO_ALL)
    def hs_load_teacher(self, directory: str) -> int:
        path = os.path.join(directory, f"teacher_rank{self.rank}.pt")
        if not os.path.exists(path):
            raise FileNotFoundError(f"{path} is missing: the checkpoint was saved with a different number of ranks "
                                    "or without the hindsight teacher")
        state = torch.load(path, map_location="cpu", weights_only=True)
        loaded = 0
        with torch.no_grad():
            for name, _, r in self._teacher_pairs():
                if name not in state:
                    raise KeyError(f"{path} has no teacher parameter {name!r}")
                r_local = _local(r.data)
                r_local.copy_(state[name].to(device=r_local.device, dtype=r_local.dtype))
                loaded += 1
        return loaded

    @register(dispatch_mode=Dispatch.ONE_TO_ALL)
    def hs_teacher_checksum(self) -> float:
        with torch.no_grad():
            return float(sum(_local(r.data).double().sum() for _, _, r in self._teacher_pairs()))
