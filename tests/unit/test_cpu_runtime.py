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


def test_cpu_runtime_needs_an_explicit_signal(monkeypatch):
    from verl_hindsight.runtime import cpu_platform

    monkeypatch.delenv("VERL_PLATFORM", raising=False)
    monkeypatch.setattr(cpu_platform, "accelerator_platform_available", lambda: None)
    assert "CPU-only build" in cpu_platform.cpu_runtime_reason()  # this machine's torch wheel
    # a CUDA torch build: a process whose devices Ray hid is part of a GPU job, one that hid nothing is a CPU job
    monkeypatch.setattr(cpu_platform, "torch_has_accelerator_build", lambda: True)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert cpu_platform.cpu_runtime_reason() is None
    monkeypatch.setenv("VERL_PLATFORM", "cpu")
    assert cpu_platform.cpu_runtime_reason() == "VERL_PLATFORM=cpu"
    monkeypatch.delenv("VERL_PLATFORM")
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    assert "none was hidden" in cpu_platform.cpu_runtime_reason()


# A GPU job's GPU-less Ray actor (TaskRunner, agent-loop or reward worker): a CUDA torch build, devices hidden by
# Ray, no nvidia-smi. The plugin must leave verl's own platform choice and the vLLM loader alone.
_GPU_JOB_ACTOR = r"""
import json, os, torch
torch.version.cuda = "12.8"  # what a CUDA wheel reports; nothing else of torch is touched
import verl
from verl.plugin.platform.platform_manager import get_platform
from verl.workers.rollout.replica import RolloutReplicaRegistry, _load_vllm
import verl_hindsight.register as register
from verl_hindsight.runtime.activate import cpu_runtime_active
print(json.dumps({
    "platform": type(get_platform()).__name__,
    "vllm_loader_is_verls": RolloutReplicaRegistry._registry["vllm"] is _load_vllm,
    "cpu_runtime_active": cpu_runtime_active(),
    "failed_steps": register.FAILED_STEPS,
    "VERL_PLATFORM": os.environ.get("VERL_PLATFORM"),
    "RAY_OVERRIDE_RESOURCES": os.environ.get("RAY_OVERRIDE_RESOURCES"),
}))
"""


def _run_probe(env_overrides: dict) -> dict:
    import json
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k not in ("VERL_PLATFORM", "RAY_OVERRIDE_RESOURCES")}
    env.update(env_overrides)
    out = subprocess.run([sys.executable, "-c", _GPU_JOB_ACTOR], env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_a_gpu_jobs_gpu_less_actor_keeps_verls_platform_and_vllm_loader():
    seen = _run_probe({"CUDA_VISIBLE_DEVICES": ""})
    assert seen == {"platform": "PlatformCUDA", "vllm_loader_is_verls": True, "cpu_runtime_active": False,
                    "failed_steps": [], "VERL_PLATFORM": None, "RAY_OVERRIDE_RESOURCES": None}


def test_a_cpu_job_pins_its_decision_for_the_processes_it_starts():
    # the same CUDA build with nothing hidden (a laptop with the default wheel): CPU, and Ray's actors inherit it
    seen = _run_probe({})
    assert seen["platform"] == "PlatformCPU" and seen["cpu_runtime_active"]
    assert not seen["vllm_loader_is_verls"] and seen["VERL_PLATFORM"] == "cpu"
    assert seen["RAY_OVERRIDE_RESOURCES"] is not None
