"""Each patch in verl_hindsight/runtime/verl_patches.py, checked against the verl it patches.

These tests fail when a verl upgrade either fixes the underlying problem (the patch became unnecessary:
remove it) or changes the patched code (the patch may now be wrong: re-check it).
"""

import inspect

import pytest
import torch


def test_gloo_patch_is_still_needed_and_works(monkeypatch):
    import verl.utils.distributed as dist_utils

    from verl_hindsight.runtime.verl_patches import CPU_PROCESS_GROUP_BACKEND

    patched = dist_utils.initialize_global_process_group_ray
    original = patched.__wrapped__
    seen = {}
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: False)
    monkeypatch.setattr(torch.distributed, "init_process_group", lambda backend, **kw: seen.setdefault("b", backend))
    original()
    # verl still builds "cpu:gloo,<device>:<backend>", which on the CPU platform duplicates the cpu device
    assert seen["b"] == "cpu:gloo,cpu:gloo", "verl changed its backend string: re-check the gloo patch"
    seen.clear()
    patched()
    assert seen["b"] == CPU_PROCESS_GROUP_BACKEND
    seen.clear()
    patched(backend="gloo")  # explicit choices are kept
    assert seen["b"] == "gloo"


def test_duplicate_device_backend_is_rejected_by_torch():
    """Why patch 1 exists: torch refuses the backend string verl builds on CPU."""
    from torch.distributed import Backend

    with pytest.raises(ValueError, match="Duplicate device type"):
        torch.distributed.distributed_c10d.BackendConfig(Backend("cpu:gloo,cpu:gloo"))


def test_engine_workers_uses_the_patched_function():
    import verl.utils.distributed as dist_utils
    import verl.workers.engine_workers as engine_workers

    assert engine_workers.initialize_global_process_group_ray is dist_utils.initialize_global_process_group_ray
    assert getattr(engine_workers.initialize_global_process_group_ray, "_verl_hindsight_cpu_patch", False)


def test_pinned_offload_patch_targets_verl_code_that_still_pins():
    from verl.workers.engine.fsdp import transformer_impl

    from verl_hindsight.runtime.verl_patches import unpinned_cpu_offload

    source = inspect.getsource(transformer_impl.FSDPEngine._build_fsdp_module)
    assert "CPUOffloadPolicy(pin_memory=True)" in source, "verl no longer pins: remove unpinned_cpu_offload"
    original = transformer_impl.CPUOffloadPolicy
    with unpinned_cpu_offload():
        policy = transformer_impl.CPUOffloadPolicy(pin_memory=True)
    assert transformer_impl.CPUOffloadPolicy is original
    assert isinstance(policy, original) and policy.pin_memory is False


def test_pinning_is_impossible_without_an_accelerator():
    """Why patch 2 exists."""
    with pytest.raises(RuntimeError):
        torch.empty(4).pin_memory()


def test_rollout_adapter_registry_is_still_private_and_keyed_by_name_and_mode():
    from verl.workers.rollout import base as rollout_base

    assert not hasattr(rollout_base, "register_rollout"), "verl has a public adapter registry now: use it"
    assert ("vllm", "async") in rollout_base._ROLLOUT_REGISTRY
    assert rollout_base.get_rollout_class("hf", "async").__name__ == "HFServerAdapter"
