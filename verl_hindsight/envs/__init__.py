"""Benchmark environments behind one small protocol (:mod:`.base`), run in worker processes (:mod:`.runner`)."""

from verl_hindsight.envs.base import (
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
