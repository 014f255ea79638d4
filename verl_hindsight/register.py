"""The ``verl.plugins`` entry point: registers everything verl-hindsight provides with verl's registries.

verl imports this module on ``import verl`` in every process it starts (driver, TaskRunner, workers,
agent-loop and reward workers, rollout servers), so it must stay light and must never raise into verl's
import: each registration step runs on its own, and a failure is logged at WARNING with its cause.

On machines with an accelerator it only adds names (the CPU platform, which then never matches, and the
``hf`` rollout backend, loaded lazily). The CPU runtime (engines, patches, Ray resources) is activated only
on an explicit signal (``VERL_PLATFORM=cpu`` or a CPU-only torch build; see
``runtime.cpu_platform.cpu_runtime_reason``), never because one process of a GPU job sees no GPU.
"""

from __future__ import annotations

import logging

logger = logging.getLogger("verl_hindsight")

# Accelerator-only rollout backends that would fail obscurely on a CPU-only machine.
_GPU_ROLLOUTS = ("vllm", "sglang", "trtllm")


def _load_hf_replica():
    from verl_hindsight.rollout.hf_replica import HFReplica

    return HFReplica


def _gpu_rollout_on_cpu(name: str):
    def loader():
        raise RuntimeError(
            f"actor_rollout_ref.rollout.name={name} needs a GPU, and this machine runs the verl-hindsight CPU "
            "runtime (no accelerator found). Set actor_rollout_ref.rollout.name=hf to use the plugin's "
            "transformers rollout backend on CPU."
        )

    return loader


def register_cpu_platform() -> None:
    import verl_hindsight.runtime.cpu_platform  # noqa: F401  (registers "cpu" with PlatformRegistry)


def register_rollout_backends() -> None:
    from verl.workers.rollout.replica import RolloutReplicaRegistry

    from verl_hindsight.runtime.verl_patches import HF_ROLLOUT_NAME, register_rollout_adapter

    RolloutReplicaRegistry.register(HF_ROLLOUT_NAME, _load_hf_replica)
    register_rollout_adapter()


def activate_cpu_runtime_if_selected() -> None:
    from verl_hindsight.runtime.cpu_platform import cpu_runtime_reason, pin_cpu_platform_for_child_processes

    reason = cpu_runtime_reason()
    if reason is None:
        return
    from verl.workers.rollout.replica import RolloutReplicaRegistry

    from verl_hindsight.runtime.activate import activate_cpu_runtime

    logger.info("verl-hindsight: CPU runtime selected (%s)", reason)
    pin_cpu_platform_for_child_processes(reason)
    activate_cpu_runtime()
    for name in _GPU_ROLLOUTS:
        RolloutReplicaRegistry.register(name, _gpu_rollout_on_cpu(name))


def _import(module: str):
    def load():
        import importlib

        importlib.import_module(module)

    return load


def register_on_import() -> None:
    """Registrations that need heavy verl modules run when those modules are imported anyway."""
    from verl_hindsight.post_import import when_imported

    # the `hindsight` V1 trainer, in the TaskRunner (which imports verl.trainer.ppo.v1 to look trainers up)
    when_imported("verl.trainer.ppo.v1", _import("verl_hindsight.trainer.hindsight_trainer"))
    # the `serl` advantage estimator (verl's register_adv_est), wherever verl's estimators are looked up
    when_imported("verl.trainer.ppo.core_algos", _import("verl_hindsight.algo.serl"))
    # agent loops (@register), in the agent-loop workers
    when_imported("verl.experimental.agent_loop.agent_loop", _import("verl_hindsight.agent_loops.text_env"))
    when_imported("verl.experimental.agent_loop.agent_loop", _import("verl_hindsight.agent_loops.tool_env"))


REGISTRATION_STEPS = (register_cpu_platform, register_rollout_backends, activate_cpu_runtime_if_selected,
                      register_on_import)


def register_all() -> list[str]:
    """Run every registration step; return the names of the steps that failed (each already logged)."""
    failed = []
    for step in REGISTRATION_STEPS:
        try:
            step()
        except Exception as exc:  # never raise into `import verl`
            failed.append(step.__name__)
            logger.warning("verl-hindsight: %s failed: %s: %s", step.__name__, type(exc).__name__, exc)
    return failed


FAILED_STEPS = register_all()
