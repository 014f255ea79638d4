"""Switch the CPU runtime on in this process (idempotent).

Called from the plugin entry point when verl will resolve to the CPU platform, and again from
``PlatformCPU.__init__`` as a safety net. On machines with an accelerator this module is never imported.
"""

from __future__ import annotations

import logging
import threading
import warnings

logger = logging.getLogger(__name__)

_lock = threading.RLock()
_active = False
_activating = False


def activate_cpu_runtime() -> None:
    global _active, _activating
    with _lock:
        # Re-entrant call: importing verl's engine modules below resolves the platform, which constructs
        # PlatformCPU, which calls back here. The outer call finishes the job.
        if _active or _activating:
            return
        _activating = True
        try:
            with warnings.catch_warnings():
                # verl's engine package warns about every optional backend it cannot import (torchtitan,
                # megatron, ...); importing it here would print that list in every process on CPU.
                warnings.filterwarnings("ignore", message=r".* engine is not available", category=UserWarning)
                from verl_hindsight.runtime.cpu_engine import register_cpu_engines
            from verl_hindsight.runtime.ray_resources import advertise_cpu_ray_resources
            from verl_hindsight.runtime.verl_patches import patch_gloo_process_group

            patch_gloo_process_group()
            register_cpu_engines()
            advertise_cpu_ray_resources()
            _active = True
        finally:
            _activating = False
        logger.info("verl-hindsight CPU runtime active")


def cpu_runtime_active() -> bool:
    return _active
