"""A CPU platform for verl's platform registry.

verl 0.9.1 only knows accelerator platforms and falls back to "nvidia" when none is found, which then asks
for NCCL and CUDA devices. This platform is what verl resolves to on an explicit CPU signal
(:func:`cpu_runtime_reason`), and it is the single switch for the whole CPU runtime: the narrow compatibility
patches and the CPU engine registrations are activated from here, never on GPU machines.

Two deliberate departures from the abstract interface, each forced by verl code that treats the platform's
answers as accelerator answers:
- ``ray_resource_name()`` is "GPU": verl's resource pools always request GPU bundles
  (``ResourcePoolManager.create_resource_pool(use_gpu=True)``); the CPU runtime advertises logical Ray GPUs.
- ``current_device()`` returns ``torch.device("cpu")`` rather than an index: verl passes it straight to
  ``.to()`` and ``torch.device()``, where an int would mean ``cuda:<int>``.
"""

from __future__ import annotations

import logging
import os
from contextlib import contextmanager
from types import ModuleType, SimpleNamespace
from typing import Any, Optional

import torch
from verl.plugin.platform.platform_base import PlatformBase
from verl.plugin.platform.platform_manager import PlatformRegistry

logger = logging.getLogger(__name__)

PLATFORM_NAME = "cpu"


def _noop(*_args, **_kwargs):
    return None


def _zero(*_args, **_kwargs):
    return 0


class _CPUDeviceModule(ModuleType):
    """``torch.cpu`` plus the ``torch.cuda``-style calls verl makes on its device module.

    verl calls ``get_torch_device().<fn>`` for memory statistics, cache flushing and RNG state; ``torch.cpu``
    lacks most of these. Attributes not listed here fall through to ``torch.cpu``.
    """

    def __init__(self):
        super().__init__("verl_hindsight_cpu_device")

    def __getattr__(self, name: str) -> Any:
        return getattr(torch.cpu, name)

    # memory statistics: a CPU process has no separate device pool to report
    empty_cache = staticmethod(_noop)
    ipc_collect = staticmethod(_noop)
    reset_peak_memory_stats = staticmethod(_noop)
    memory_allocated = staticmethod(_zero)
    max_memory_allocated = staticmethod(_zero)
    memory_reserved = staticmethod(_zero)
    max_memory_reserved = staticmethod(_zero)

    @staticmethod
    def mem_get_info(*_args, **_kwargs):
        import psutil

        vm = psutil.virtual_memory()
        return vm.available, vm.total

    @staticmethod
    def memory_stats(*_args, **_kwargs):
        return {}

    # RNG: the CPU generator is the only one
    get_rng_state = staticmethod(torch.get_rng_state)
    set_rng_state = staticmethod(torch.set_rng_state)
    manual_seed = staticmethod(torch.manual_seed)
    manual_seed_all = staticmethod(torch.manual_seed)

    @staticmethod
    def is_available() -> bool:
        return True

    @staticmethod
    def device_count() -> int:
        return 1

    @staticmethod
    def current_device():
        return torch.device("cpu")

    set_device = staticmethod(_noop)
    synchronize = staticmethod(_noop)

    @staticmethod
    def get_device_name(*_args, **_kwargs) -> str:
        return "cpu"

    @staticmethod
    def get_device_properties(*_args, **_kwargs):
        import psutil

        return SimpleNamespace(name="cpu", total_memory=psutil.virtual_memory().total)


_DEVICE_MODULE = _CPUDeviceModule()


def accelerator_platform_available() -> Optional[str]:
    """Name of a registered non-CPU platform that is available on this host, else None.

    Mirrors verl's own auto-detection (``is_platform_available(use_smi_check=True)``) so that the CPU
    platform never claims a machine an accelerator platform would have claimed.
    """
    for name in PlatformRegistry.registered_names():
        if name == PLATFORM_NAME:
            continue
        cls = PlatformRegistry.get(name)
        try:
            if cls is not None and cls().is_platform_available(use_smi_check=True):
                return name
        except Exception as exc:  # a broken vendor probe must not make us claim the machine silently
            logger.debug("platform probe %s failed: %s", name, exc)
    return None


def torch_has_accelerator_build() -> bool:
    """Whether this torch build can drive any accelerator (CUDA, ROCm, XPU, NPU); a CPU-only wheel cannot."""
    if torch.version.cuda or getattr(torch.version, "hip", None):
        return True
    if getattr(torch, "xpu", None) is not None and torch.xpu._is_compiled():
        return True
    return hasattr(torch, "npu")  # torch_npu patches itself into torch


HIDDEN_DEVICE_VARS = ("CUDA_VISIBLE_DEVICES", "HIP_VISIBLE_DEVICES", "ROCR_VISIBLE_DEVICES",
                      "ASCEND_RT_VISIBLE_DEVICES")


def devices_hidden() -> bool:
    """Whether this process's accelerators were hidden on purpose (Ray does this for actors without GPUs).

    Such a process (a GPU job's TaskRunner, agent-loop or reward worker) sees no device, yet the job is a GPU
    job: it must never decide on its own that it runs on CPU.
    """
    return any(os.environ.get(var) is not None and os.environ[var].strip() in ("", "-1")
               for var in HIDDEN_DEVICE_VARS)


def cpu_runtime_reason() -> Optional[str]:
    """Why this process runs the CPU runtime, or None when verl's own platform choice is left alone.

    Only explicit signals select the CPU runtime: ``VERL_PLATFORM=cpu``, or a torch build that has no
    accelerator support at all. A process whose devices were hidden (a GPU job's GPU-less Ray actor) never
    selects it without ``VERL_PLATFORM=cpu``. The remaining case, an accelerator-capable torch in a process
    that sees no accelerator and had none hidden, is a CPU job started on a machine without one (a laptop with
    the default CUDA wheel).
    """
    requested = os.environ.get("VERL_PLATFORM", "").strip().lower()
    if requested:
        return f"VERL_PLATFORM={requested}" if requested == PLATFORM_NAME else None
    if accelerator_platform_available() is not None:
        return None
    if not torch_has_accelerator_build():
        return f"torch {torch.__version__} is a CPU-only build"
    if devices_hidden():
        return None
    return NO_DEVICE_REASON


def cpu_runtime_selected() -> bool:
    """Whether verl will resolve to this platform in this process (see :func:`cpu_runtime_reason`)."""
    return cpu_runtime_reason() is not None


NO_DEVICE_REASON = "no accelerator is visible to this process and none was hidden from it"


def pin_cpu_platform_for_child_processes(reason: str) -> None:
    """Make the processes this one starts (Ray's local node and its actors) inherit a CPU decision that they
    could not reach on their own.

    Only the last rule of :func:`cpu_runtime_reason` needs it: an actor of such a job has an accelerator-capable
    torch and (under Ray) hidden devices, so without ``VERL_PLATFORM=cpu`` it would defer to verl's CUDA
    fallback. ``VERL_PLATFORM`` and a CPU-only torch build hold in every child anyway.
    """
    if reason == NO_DEVICE_REASON:
        os.environ.setdefault("VERL_PLATFORM", PLATFORM_NAME)


@PlatformRegistry.register(platform=PLATFORM_NAME)
class PlatformCPU(PlatformBase):
    """verl platform for machines without an accelerator (development laptops, CI)."""

    def __init__(self):
        super().__init__()
        # verl instantiates every registered platform while probing; only activate the CPU runtime in the
        # process where this platform is the one verl will use.
        if cpu_runtime_selected():
            try:
                from verl_hindsight.runtime.activate import activate_cpu_runtime

                activate_cpu_runtime()
            except Exception as exc:  # the platform must still construct; the entry point logged the cause
                logger.warning("verl-hindsight: CPU runtime activation failed: %s: %s", type(exc).__name__, exc)

    @property
    def device_name(self) -> str:
        return "cpu"

    @property
    def vendor_name(self) -> str:
        return "cpu"

    @property
    def device_module(self) -> ModuleType:
        return _DEVICE_MODULE

    def is_available(self) -> bool:
        return True

    def is_platform_available(self, use_smi_check: bool = False) -> bool:
        return cpu_runtime_selected()

    def current_device(self):  # see module docstring: verl uses this value as a device
        return torch.device("cpu")

    def device_count(self) -> int:
        return 1

    def set_device(self, device_index: int) -> None:
        return None

    def synchronize(self, device_index: Optional[int] = None) -> None:
        return None

    def manual_seed(self, seed: int) -> None:
        torch.manual_seed(seed)

    def manual_seed_all(self, seed: int) -> None:
        torch.manual_seed(seed)

    def set_allocator_settings(self, settings: str) -> None:
        return None

    def empty_cache(self) -> None:
        return None

    def get_device_capability(self, device_index: int = 0):
        return None, None

    def communication_backend_name(self) -> str:
        return "gloo"

    def visible_devices_envvar(self) -> str:
        # Ray sets this for actors holding (logical) GPUs; harmless on a CPU-only torch build.
        return "CUDA_VISIBLE_DEVICES"

    @contextmanager
    def nvtx_range(self, msg: str):
        yield

    def profiler_start(self) -> None:
        return None

    def profiler_stop(self) -> None:
        return None

    def ray_resource_name(self) -> str:
        return "GPU"

    def ray_noset_envvars(self) -> list[str]:
        return []

    def is_ipc_supported(self) -> bool:
        return False

    def cudart(self) -> Any:
        return None
