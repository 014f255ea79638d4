"""Every place where verl-hindsight reaches into verl 0.9.1 beyond its public registries.

Each entry exists because no registry or subclass hook covers it; each is narrow, and each has a test in
``tests/unit/test_verl_patches.py`` that fails loudly when a verl upgrade makes it unnecessary or wrong.
Nothing here runs on GPU machines except :func:`register_rollout_adapter`, which only adds a new key.

1. ``gloo_process_group`` (CPU only): verl builds the process-group backend as
   ``f"cpu:gloo,{device}:{backend}"``; on the CPU platform that is ``"cpu:gloo,cpu:gloo"``, which torch rejects
   as a duplicate device. We default the backend to ``"cpu:gloo"``.
2. ``unpinned_cpu_offload`` (CPU only, scoped to the CPU engine's FSDP build): the forward-only (reference)
   FSDP2 engine hard-codes ``CPUOffloadPolicy(pin_memory=True)``; pinning needs an accelerator.
3. ``register_rollout_adapter``: the worker-side rollout adapters live in the private dict
   ``verl.workers.rollout.base._ROLLOUT_REGISTRY`` (no public register function in 0.9.1).
"""

from __future__ import annotations

import contextlib
import functools
import logging

logger = logging.getLogger(__name__)

CPU_PROCESS_GROUP_BACKEND = "cpu:gloo"

_PATCHED_MARK = "_verl_hindsight_cpu_patch"


def _default_backend_to_gloo(fn):
    @functools.wraps(fn)
    def wrapper(*args, backend=None, **kwargs):
        return fn(*args, backend=backend or CPU_PROCESS_GROUP_BACKEND, **kwargs)

    setattr(wrapper, _PATCHED_MARK, True)
    wrapper.__wrapped__ = fn
    return wrapper


def patch_gloo_process_group() -> None:
    """Patch 1: make verl's Ray process-group initialisation use plain gloo on the CPU platform."""
    import sys

    import verl.utils.distributed as dist_utils

    original = dist_utils.initialize_global_process_group_ray
    if getattr(original, _PATCHED_MARK, False):
        return
    patched = _default_backend_to_gloo(original)
    dist_utils.initialize_global_process_group_ray = patched
    # Modules that did `from verl.utils.distributed import initialize_global_process_group_ray` before we ran
    # hold their own reference; rebind it there too.
    for module_name in ("verl.workers.engine_workers", "verl.checkpoint_engine.base"):
        module = sys.modules.get(module_name)
        if module is not None and getattr(module, "initialize_global_process_group_ray", None) is original:
            module.initialize_global_process_group_ray = patched


@contextlib.contextmanager
def unpinned_cpu_offload():
    """Patch 2: within the block, FSDP2 ``CPUOffloadPolicy`` built by verl's FSDP engine never pins memory."""
    from verl.workers.engine.fsdp import transformer_impl

    original = transformer_impl.CPUOffloadPolicy

    def unpinned(*args, **kwargs):
        kwargs["pin_memory"] = False
        return original(*args, **kwargs)

    transformer_impl.CPUOffloadPolicy = unpinned
    try:
        yield
    finally:
        transformer_impl.CPUOffloadPolicy = original


HF_ROLLOUT_NAME = "hf"
HF_ADAPTER_FQN = "verl_hindsight.rollout.hf_replica.HFServerAdapter"


def register_rollout_adapter(name: str = HF_ROLLOUT_NAME, fqn: str = HF_ADAPTER_FQN) -> None:
    """Patch 3: add the worker-side adapter of a rollout backend to verl's private adapter registry."""
    from verl.workers.rollout import base as rollout_base

    registry = rollout_base._ROLLOUT_REGISTRY
    existing = registry.get((name, "async"))
    if existing not in (None, fqn):
        raise RuntimeError(f"rollout adapter {name!r} is already registered as {existing}")
    registry[(name, "async")] = fqn
