"""Logical Ray resources for the CPU runtime, so stock ``main_ppo`` needs no ``ray_kwargs`` overrides.

verl's resource pools always request accelerator bundles (``{"CPU": 3, "GPU": 1}`` per worker), and
TransferQueue places its storage units with one CPU each. On a 2-core machine with no GPU, Ray would wait
forever for those bundles (a silent hang). When this process starts a local Ray node, it therefore advertises
logical resources through Ray's documented ``RAY_OVERRIDE_RESOURCES`` variable. They are scheduling tokens,
not hardware claims: every actor still shares the real cores.

Users who start Ray themselves (``ray start``/``address=``) or set ``RAY_OVERRIDE_RESOURCES`` keep full
control: an existing value is never changed.
"""

from __future__ import annotations

import json
import logging
import os

logger = logging.getLogger(__name__)

RAY_OVERRIDE_ENV = "RAY_OVERRIDE_RESOURCES"
# verl's default trainer.n_gpus_per_node is 8; advertising as many logical GPUs lets an unmodified config start.
CPU_RAY_GPUS_ENV = "VERL_HINDSIGHT_CPU_RAY_GPUS"
DEFAULT_LOGICAL_GPUS = 8
# 8 TransferQueue storage units + 3 CPUs per worker bundle + agent-loop/reward workers, with headroom.
DEFAULT_LOGICAL_CPUS = 64


def cpu_ray_resources() -> dict[str, float]:
    gpus = float(os.environ.get(CPU_RAY_GPUS_ENV, DEFAULT_LOGICAL_GPUS))
    return {"CPU": float(max(DEFAULT_LOGICAL_CPUS, 4 * (os.cpu_count() or 1))), "GPU": gpus}


def advertise_cpu_ray_resources() -> None:
    if os.environ.get(RAY_OVERRIDE_ENV):
        return
    os.environ[RAY_OVERRIDE_ENV] = json.dumps(cpu_ray_resources())
