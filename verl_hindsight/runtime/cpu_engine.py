"""verl's FSDP training engines, registered for ``device="cpu"`` through verl's ``EngineRegistry``.

verl 0.9.1 registers its FSDP engines for cuda and npu only. The CPU variants are thin subclasses that
adapt the three settings that cannot work without an accelerator, so CPU runs need no override for them:
- ``strategy: fsdp`` runs as FSDP2 (FSDP1 passes an accelerator ``device_id`` and syncs module states);
- flash-attention (verl's default ``attn_implementation``) becomes PyTorch SDPA;
- FSDP2 CPU offload (used by the forward-only reference engine) does not pin memory.
Each adaptation is logged once at INFO. Imported only when the CPU runtime is active.
"""

from __future__ import annotations

import dataclasses
import logging

from verl.workers.engine.base import EngineRegistry
from verl.workers.engine.fsdp.transformer_impl import FSDPEngineWithLMHead, FSDPEngineWithValueHead

from verl_hindsight.runtime.verl_patches import unpinned_cpu_offload

logger = logging.getLogger(__name__)

CPU_ATTN_IMPLEMENTATION = "sdpa"
_ACCELERATOR_ONLY_ATTN = ("flash_attention_2", "flash_attention_3", "flash_attention", "kernels")


def adapt_engine_config_for_cpu(engine_config):
    """FSDP1 cannot run on CPU in verl 0.9.1; the same engine runs FSDP2 instead."""
    if engine_config.strategy == "fsdp":
        logger.info("verl-hindsight CPU runtime: running strategy 'fsdp' as 'fsdp2' (FSDP1 needs an accelerator)")
        return dataclasses.replace(engine_config, strategy="fsdp2")
    return engine_config


def adapt_model_config_for_cpu(model_config) -> None:
    """Swap accelerator-only attention kernels for SDPA on the model's HF config (in place)."""
    hf_config = getattr(model_config, "hf_config", None)
    if hf_config is None:
        return
    current = getattr(hf_config, "_attn_implementation", None)
    if current is None or any(current.startswith(name) for name in _ACCELERATOR_ONLY_ATTN):
        logger.info("verl-hindsight CPU runtime: attn_implementation %s -> %s", current, CPU_ATTN_IMPLEMENTATION)
        hf_config._attn_implementation = CPU_ATTN_IMPLEMENTATION


class _CPUEngineMixin:
    def __init__(self, model_config, engine_config, optimizer_config, checkpoint_config, *args, **kwargs):
        adapt_model_config_for_cpu(model_config)
        super().__init__(
            model_config, adapt_engine_config_for_cpu(engine_config), optimizer_config, checkpoint_config,
            *args, **kwargs,
        )

    def _build_fsdp_module(self, module):
        with unpinned_cpu_offload():
            return super()._build_fsdp_module(module)


class CPUFSDPEngineWithLMHead(_CPUEngineMixin, FSDPEngineWithLMHead):
    """verl's FSDP language-model engine on CPU (gloo, FSDP2, SDPA)."""


class CPUFSDPEngineWithValueHead(_CPUEngineMixin, FSDPEngineWithValueHead):
    """verl's FSDP value-model (critic) engine on CPU."""


def register_cpu_engines() -> None:
    registry = EngineRegistry._engines
    for model_type, engine_cls in (("language_model", CPUFSDPEngineWithLMHead),
                                   ("value_model", CPUFSDPEngineWithValueHead)):
        if registry.get(model_type, {}).get("fsdp2", {}).get("cpu") is engine_cls:
            continue
        EngineRegistry.register(model_type=model_type, backend=["fsdp", "fsdp2"], device="cpu")(engine_cls)
