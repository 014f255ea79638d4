"""The ``hf`` rollout server: a Ray actor serving verl's token-in/token-out ``generate`` contract.

Concurrent ``generate`` calls are queued and served together in waves by :class:`BatchedGenerator` (no
global one-request-at-a-time lock): while one wave computes in a worker thread, the actor's event loop keeps
accepting requests for the next one. A request that can never be served (prompt over ``max_model_len``,
unknown sampling parameter) is rejected on its own with a clear ``ValueError``; the server keeps serving.

Prompt scoring is the vLLM contract verl's teacher code uses: ``sampling_params={"max_tokens": 1,
"prompt_logprobs": k}`` returns ``extra_fields["prompt_ids"]`` / ``extra_fields["prompt_logprobs"]``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Optional

import torch

from verl_hindsight.rollout.hf_generation import (
    BatchedGenerator,
    GenerationRequest,
    GenerationResult,
    RequestRejected,
    build_request,
)

logger = logging.getLogger(__name__)

# After an idle period, keep collecting while requests are still arriving (a burst from an agent-loop worker
# reaches the actor over several milliseconds), at most COALESCE_MAX_SECONDS, so the burst forms one wave.
COALESCE_QUIET_SECONDS = 0.002
COALESCE_MAX_SECONDS = 0.05


@dataclass
class _Pending:
    request: GenerationRequest
    future: asyncio.Future
    enqueued: float = field(default_factory=time.monotonic)


def _torch_dtype(name: Any) -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    table = {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16,
             "half": torch.float16, "float32": torch.float32, "fp32": torch.float32, "float": torch.float32}
    if str(name) not in table:
        raise ValueError(f"hf rollout: unsupported actor_rollout_ref.rollout.dtype={name!r}; use float32 or bfloat16")
    return table[str(name)]


def _local_model_path(model_config) -> str:
    """The replica passes the model config as a DictConfig (HFModelConfig before conversion)."""
    local = model_config.get("local_path", None) if hasattr(model_config, "get") else None
    if local:
        return local
    from verl.utils.fs import copy_to_local

    return copy_to_local(model_config.get("path"), use_shm=bool(model_config.get("use_shm", False)))


class HFRolloutServer:
    """Holds one transformers model and serves batched generation. Wrapped with ``ray.remote`` by the replica."""

    def __init__(self, config, model_config, replica_rank: int = 0, model_path: Optional[str] = None):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.config = config
        self.replica_rank = replica_rank
        path = model_path or _local_model_path(model_config)
        trust = bool(model_config.get("trust_remote_code", False))
        self.tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust)
        self.model = AutoModelForCausalLM.from_pretrained(
            path, dtype=_torch_dtype(getattr(config, "dtype", "float32")), attn_implementation="sdpa",
            trust_remote_code=trust,
        ).eval()
        hf_cfg = self.model.config
        model_limit = int(getattr(hf_cfg, "max_position_embeddings", 1 << 30))
        configured = getattr(config, "max_model_len", None)
        self.max_model_len = min(int(configured), model_limit) if configured else model_limit
        self.prompt_length = int(getattr(config, "prompt_length", 512))
        self.response_length = int(getattr(config, "response_length", 512))
        self.max_batch_size = max(1, int(getattr(config, "max_num_seqs", 256) or 256))
        eos = getattr(self.model.generation_config, "eos_token_id", None) or hf_cfg.eos_token_id
        self.eos_token_ids = frozenset([eos] if isinstance(eos, int) else list(eos or []))
        pad = self.tokenizer.pad_token_id
        self.generator = BatchedGenerator(
            self.model,
            pad_token_id=pad if pad is not None else next(iter(self.eos_token_ids), 0),
            logprobs_mode=getattr(config, "logprobs_mode", None) or "processed_logprobs",
            tokenizer=self.tokenizer,
        )
        self.vocab_size = int(self.model.get_input_embeddings().weight.shape[0])
        self.global_steps: Optional[int] = None
        self._pending: list[_Pending] = []
        self._wakeup: Optional[asyncio.Event] = None
        self._scheduler: Optional[asyncio.Task] = None
        self._compute_lock: Optional[asyncio.Lock] = None  # waves vs weight updates, never request vs request
        self._staged_weights: dict[str, torch.Tensor] = {}
        self._paused = False
        self.stats = {"waves": 0, "requests": 0, "max_wave": 0}

    # ------------------------------------------------------------------ generation
    async def generate(
        self,
        prompt_ids: list[int],
        sampling_params: dict[str, Any],
        request_id: str,
        image_data: Optional[list[Any]] = None,
        video_data: Optional[list[Any]] = None,
        audio_data: Optional[list[Any]] = None,
        mm_processor_kwargs: Optional[dict[str, Any]] = None,
        priority: int = 0,
    ):
        from verl.workers.rollout.replica import TokenOutput

        if image_data is not None or video_data is not None or audio_data is not None:
            raise RequestRejected("hf rollout: multimodal inputs are not supported; use the vllm or sglang rollout")
        request = build_request(
            prompt_ids,
            sampling_params,
            max_model_len=self.max_model_len,
            response_length=self.response_length,
            prompt_length=self.prompt_length,
            eos_token_ids=self.eos_token_ids,
            vocab_size=self.vocab_size,
        )
        extra_fields: dict[str, Any] = {"global_steps": self.global_steps}
        if self._paused:
            return TokenOutput(token_ids=[], log_probs=None, stop_reason="aborted", extra_fields=extra_fields)
        result: GenerationResult = await self._submit(request)
        extra_fields = {"global_steps": self.global_steps}
        if result.prompt_logprobs is not None:
            extra_fields["prompt_ids"] = result.prompt_ids_topk
            extra_fields["prompt_logprobs"] = result.prompt_logprobs
        stop_reason = "aborted" if result.finish_reason == "abort" else "completed"
        return TokenOutput(token_ids=result.token_ids, log_probs=result.log_probs, stop_reason=stop_reason,
                           extra_fields=extra_fields)

    async def _submit(self, request: GenerationRequest) -> GenerationResult:
        self._ensure_scheduler()
        future = asyncio.get_running_loop().create_future()
        self._pending.append(_Pending(request, future))
        self._wakeup.set()
        return await future

    def _ensure_scheduler(self) -> None:
        if self._scheduler is None or self._scheduler.done():
            self._wakeup = asyncio.Event()
            self._compute_lock = asyncio.Lock()
            self._scheduler = asyncio.get_running_loop().create_task(self._schedule_forever())

    async def _schedule_forever(self) -> None:
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            await self._coalesce()
            while self._pending:
                wave, self._pending = self._pending[: self.max_batch_size], self._pending[self.max_batch_size:]
                async with self._compute_lock:
                    try:
                        results = await asyncio.to_thread(self.generator.run, [p.request for p in wave])
                    except Exception as exc:  # a failing wave fails its requests, never the server
                        logger.exception("hf rollout: wave of %d requests failed", len(wave))
                        for p in wave:
                            if not p.future.done():
                                p.future.set_exception(exc)
                        continue
                self.stats["waves"] += 1
                self.stats["requests"] += len(wave)
                self.stats["max_wave"] = max(self.stats["max_wave"], len(wave))
                for p, r in zip(wave, results):
                    if not p.future.done():
                        p.future.set_result(r)

    async def _coalesce(self) -> None:
        deadline = time.monotonic() + COALESCE_MAX_SECONDS
        seen = -1
        while len(self._pending) != seen and len(self._pending) < self.max_batch_size and time.monotonic() < deadline:
            seen = len(self._pending)
            await asyncio.sleep(COALESCE_QUIET_SECONDS)

    async def get_stats(self) -> dict[str, int]:
        return dict(self.stats)

    # ------------------------------------------------------------------ weights
    async def load_weights(self, named_tensors: list[tuple[str, torch.Tensor]]) -> None:
        """Stage one bucket of an update; applied atomically by :meth:`finish_weight_update`."""
        for name, tensor in named_tensors:
            self._staged_weights[name] = tensor

    async def finish_weight_update(self, global_steps: Optional[int] = None) -> int:
        staged, self._staged_weights = self._staged_weights, {}
        state = self.model.state_dict()
        unknown = sorted(set(staged) - set(state))
        if unknown:
            raise KeyError(f"hf rollout: weight update has parameters the rollout model does not know: {unknown[:5]}")
        tied = {"lm_head.weight"} if getattr(self.model.config, "tie_word_embeddings", False) else set()
        missing = sorted(set(state) - set(staged) - tied)
        if missing:
            raise KeyError(f"hf rollout: weight update is missing parameters {missing[:5]}")
        lock = self._compute_lock or asyncio.Lock()
        async with lock:  # never swap weights in the middle of a wave
            with torch.no_grad():
                for name, tensor in staged.items():
                    state[name].copy_(tensor.to(dtype=state[name].dtype))
        self.global_steps = global_steps
        return len(staged)

    # ------------------------------------------------------------------ lifecycle (verl's server interface)
    async def wake_up(self):
        return None

    async def sleep(self):
        return None

    async def clear_kv_cache(self):
        return None  # the KV cache lives only for the duration of a wave

    async def release_kv_cache(self):
        return None

    async def resume_kv_cache(self):
        return None

    async def abort_all_requests(self, reject_request: bool = False):
        self._paused = bool(reject_request)
        self.generator.abort_requested = True
        for p in self._pending:
            if not p.future.done():
                p.future.set_result(GenerationResult(token_ids=[], log_probs=None, finish_reason="abort"))
        self._pending = []

    async def resume_generation(self):
        self._paused = False
        self.generator.abort_requested = False

    async def start_profile(self, **kwargs):
        return None

    async def stop_profile(self):
        return None
