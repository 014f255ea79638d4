"""The environment protocol every benchmark implements (:mod:`.protocol`), its registry, and the worker processes
that run environments with time limits (:mod:`.runner`). The benchmark adapters themselves live in
:mod:`verl_hindsight.envs` (the repository's top-level ``envs/`` folder)."""

from verl_hindsight.environment.protocol import (
    Environment,
    MalformedEnvOutput,
    Observation,
    StepResult,
    make_env,
    register_env,
    registered_envs,
)

__all__ = ["Environment", "MalformedEnvOutput", "Observation", "StepResult", "make_env", "register_env",
           "registered_envs"]
