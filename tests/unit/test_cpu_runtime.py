"""The CPU platform, the CPU engine registrations and the plugin entry point."""

import logging

import pytest
import torch


def test_plugin_is_loaded_by_import_verl_and_registers_everything():
    import verl  # noqa: F401  (loads the verl.plugins entry points)
    from verl.plugin.platform.platform_manager import PlatformRegistry
    from verl.workers.rollout.base import _ROLLOUT_REGISTRY
    from verl.workers.rollout.replica import RolloutReplicaRegistry

    import verl_hindsight.register as register

    assert register.FAILED_STEPS == []
    assert "cpu" in PlatformRegistry.registered_names()
    assert RolloutReplicaRegistry.get("hf").__name__ == "HFReplica"
    assert _ROLLOUT_REGISTRY[("hf", "async")] == "verl_hindsight.rollout.hf_replica.HFServerAdapter"


def test_cpu_platform_is_what_verl_resolves_to_here():
    from verl.utils.device import get_device_name, get_nccl_backend, get_torch_device

    assert not torch.cuda.is_available()
    assert get_device_name() == "cpu"
    assert get_nccl_backend() == "gloo"
    dev = get_torch_device()
    # the calls verl makes on its device module all work on CPU
    dev.empty_cache()
    dev.synchronize()
    assert dev.memory_allocated() == 0 and dev.max_memory_allocated() == 0
    free, total = dev.mem_get_info()
    assert 0 < free <= total
    state = dev.get_rng_state()
    dev.set_rng_state(state)
    assert dev.current_device() == torch.device("cpu")
    assert torch.zeros(2).to(dev.current_device()).device.type == "cpu"


def test_cpu_platform_yields_to_an_explicit_or_detected_accelerator(monkeypatch):
    from verl_hindsight.runtime import cpu_platform

    monkeypatch.setenv("VERL_PLATFORM", "nvidia")
    assert not cpu_platform.cpu_runtime_selected()
    monkeypatch.setenv("VERL_PLATFORM", "cpu")
    assert cpu_platform.cpu_runtime_selected()
    monkeypatch.delenv("VERL_PLATFORM")
    assert cpu_platform.cpu_runtime_selected()  # nothing else is available on this machine
    monkeypatch.setattr(cpu_platform, "accelerator_platform_available", lambda: "nvidia")
    assert not cpu_platform.cpu_runtime_selected()
    assert not cpu_platform.PlatformCPU.is_platform_available(object.__new__(cpu_platform.PlatformCPU), True)


def test_cpu_engines_are_registered_for_both_fsdp_backends():
    from verl.workers.engine.base import EngineRegistry

    from verl_hindsight.runtime.cpu_engine import CPUFSDPEngineWithLMHead, CPUFSDPEngineWithValueHead

    for backend in ("fsdp", "fsdp2"):
        assert EngineRegistry.get_engine_cls("language_model", backend) is CPUFSDPEngineWithLMHead
        assert EngineRegistry.get_engine_cls("value_model", backend) is CPUFSDPEngineWithValueHead


def test_engine_config_and_attention_are_adapted_for_cpu(tiny_model_dir):
    from verl.workers.config import FSDPEngineConfig, HFModelConfig

    from verl_hindsight.runtime.cpu_engine import adapt_engine_config_for_cpu, adapt_model_config_for_cpu

    cfg = FSDPEngineConfig(strategy="fsdp")
    adapted = adapt_engine_config_for_cpu(cfg)
    assert adapted.strategy == "fsdp2" and cfg.strategy == "fsdp"
    assert adapt_engine_config_for_cpu(adapted) is adapted

    model_cfg = HFModelConfig(path=str(tiny_model_dir))  # verl's default attention: flash_attention_2
    assert model_cfg.hf_config._attn_implementation == "flash_attention_2"
    adapt_model_config_for_cpu(model_cfg)
    assert model_cfg.hf_config._attn_implementation == "sdpa"


def test_gpu_rollouts_fail_early_with_the_override_to_use():
    from verl.workers.rollout.replica import RolloutReplicaRegistry

    for name in ("vllm", "sglang"):
        with pytest.raises(RuntimeError, match=rf"rollout.name={name} needs a GPU.*rollout.name=hf"):
            RolloutReplicaRegistry.get(name)


def test_cpu_ray_resources_are_advertised_but_never_override_the_user(monkeypatch):
    import json

    from verl_hindsight.runtime import ray_resources

    assert json.loads(__import__("os").environ[ray_resources.RAY_OVERRIDE_ENV])["GPU"] >= 1
    monkeypatch.setenv(ray_resources.RAY_OVERRIDE_ENV, '{"CPU": 3}')
    ray_resources.advertise_cpu_ray_resources()
    assert __import__("os").environ[ray_resources.RAY_OVERRIDE_ENV] == '{"CPU": 3}'


def test_a_failing_registration_step_is_logged_not_raised(monkeypatch, caplog):
    import verl_hindsight.register as register

    def broken():
        raise ImportError("simulated missing dependency")

    monkeypatch.setattr(register, "REGISTRATION_STEPS", (broken, *register.REGISTRATION_STEPS))
    with caplog.at_level(logging.WARNING, logger="verl_hindsight"):
        failed = register.register_all()
    assert failed == ["broken"]
    assert "broken failed: ImportError: simulated missing dependency" in caplog.text


def test_plugin_import_in_a_fresh_interpreter_is_clean(tmp_path):
    """`import verl` with the plugin must not print warnings or raise (it runs in every verl process)."""
    import subprocess
    import sys

    code = "import verl, verl_hindsight.register as r; print('FAILED', r.FAILED_STEPS)"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "FAILED []" in proc.stdout
    assert "Traceback" not in proc.stderr and "engine is not available" not in proc.stderr
