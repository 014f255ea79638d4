"""verl wiring of the ``hf`` rollout backend (``actor_rollout_ref.rollout.name=hf``).

- :class:`HFReplica` (registered through ``RolloutReplicaRegistry``) launches one :class:`HFRolloutServer`
  actor per replica, named like verl's vLLM servers so the worker-side adapter can find it.
- :class:`HFServerAdapter` (verl's ``BaseRollout``) lives in each hybrid actor worker. After every update
  verl calls ``update_weights`` with the per-tensor generator of the training engine; every rank drains it
  (full tensors are gathered collectively) and the replica's first rank streams the tensors to the server in
  buckets, which the server applies atomically.

Only the hybrid (colocated, synchronous) mode is supported; it is the mode verl's sync trainer uses.
"""

from __future__ import annotations

import logging
import os
from typing import Generator

import ray
import torch
from verl.workers.rollout.base import BaseRollout
from verl.workers.rollout.replica import RolloutMode, RolloutReplica

from verl_hindsight.rollout.hf_server import HFRolloutServer

logger = logging.getLogger(__name__)

SERVER_NAME_PREFIX = "hf_"
WEIGHT_BUCKET_BYTES = 256 << 20


def server_actor_name(replica_rank: int, node_rank: int = 0) -> str:
    return f"{SERVER_NAME_PREFIX}server_{replica_rank}_{node_rank}"


class HFReplica(RolloutReplica):
    """One ``hf`` server per replica, living next to the hybrid actor workers."""

    async def launch_servers(self):
        if self.rollout_mode != RolloutMode.HYBRID:
            raise NotImplementedError(
                f"rollout.name=hf supports only the hybrid (colocated sync) rollout mode, got {self.rollout_mode}. "
                "Use the default synchronous trainer, or the vllm/sglang rollout for standalone/async modes."
            )
        if self.nnodes != 1:
            raise NotImplementedError("rollout.name=hf serves each replica from a single node")
        name = server_actor_name(self.replica_rank)
        server_cls = ray.remote(HFRolloutServer)
        server = server_cls.options(
            name=name,
            num_cpus=0,  # shares the hybrid workers' cores: rollout and training alternate in sync mode
            max_concurrency=self.max_concurrency,
        ).remote(config=self.config, model_config=self.model_config, replica_rank=self.replica_rank)
        # Surface load errors (bad model path, bad dtype) here rather than at the first request.
        await server.get_stats.remote()
        self.servers = [server]
        self._server_handle = server
        self._server_address = f"hf-replica-{self.replica_rank}"


class HFServerAdapter(BaseRollout):
    """Worker-side half of the ``hf`` backend: pushes the trainer's weights to the replica's server."""

    def __init__(self, config, model_config, device_mesh, replica_rank: int = -1):
        super().__init__(config, model_config, device_mesh)
        rank = int(os.environ.get("RANK", 0))
        rollout_world_size = (
            self.config.tensor_model_parallel_size
            * self.config.data_parallel_size
            * self.config.pipeline_model_parallel_size
        )
        self.replica_rank = rank // rollout_world_size if replica_rank == -1 else replica_rank
        self.is_leader = rank % rollout_world_size == 0
        self._server = None

    def _server_handle(self):
        if self._server is None:
            self._server = ray.get_actor(server_actor_name(self.replica_rank))
        return self._server

    async def resume(self, tags: list[str]):
        return None  # weights and KV cache never leave CPU memory

    async def release(self):
        return None

    async def update_weights(
        self,
        weights: Generator[tuple[str, torch.Tensor], None, None],
        wire_format: str = "named_tensors",
        **kwargs,
    ):
        if wire_format != "named_tensors":
            raise NotImplementedError(
                f"rollout.name=hf receives full named tensors only (got wire_format={wire_format!r}); "
                "use actor_rollout_ref.rollout.checkpoint_engine.backend=naive"
            )
        if kwargs.get("peft_config") is not None:
            raise NotImplementedError("rollout.name=hf needs merged weights; set actor_rollout_ref.model.lora.merge=True")
        global_steps = kwargs.get("global_steps")
        bucket: list[tuple[str, torch.Tensor]] = []
        bucket_bytes = 0
        pushes = []
        for name, tensor in weights:  # every rank drains the generator: gathering full tensors is collective
            if hasattr(tensor, "full_tensor"):
                tensor = tensor.full_tensor()
            if not self.is_leader:
                continue
            tensor = tensor.detach().to("cpu", copy=True)
            bucket.append((name, tensor))
            bucket_bytes += tensor.numel() * tensor.element_size()
            if bucket_bytes >= WEIGHT_BUCKET_BYTES:
                pushes.append(self._server_handle().load_weights.remote(bucket))
                bucket, bucket_bytes = [], 0
        if not self.is_leader:
            return
        if bucket:
            pushes.append(self._server_handle().load_weights.remote(bucket))
        for ref in pushes:
            await ref
        await self._server_handle().finish_weight_update.remote(global_steps)
