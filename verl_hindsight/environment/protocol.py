"""The environment protocol every benchmark implements, and the environment registry.

An environment is a plain, synchronous, single-episode object. The agent loop never calls it directly: it runs
inside a worker process managed by :mod:`verl_hindsight.environment.runner`, which enforces time limits and turns
crashes, hangs and malformed outputs into data on the trajectory.

Protocol (one episode at a time per instance)::

    env = make_env("toy", **kwargs)
    obs = env.reset(task_id)              # Observation(text, info)
    res = env.step("A")                   # StepResult(observation, reward, done, info)
    res = env.invalid_action(raw, why)    # the env's own answer to a malformed model action

``info`` keys with a meaning across the project (all optional):
- ``error``: the environment's complaint about the last action (wrong key, failed call), used as immediate
  hindsight feedback;
- ``admissible_actions``: list of valid action strings in the current state;
- ``anchor``: the raw observation used to group steps of a GRPO group that saw the same state;
- ``success``: whether the episode is solved (set when ``done``);
- ``invalid_action``: the action could not be parsed or is not well formed.
"""

from __future__ import annotations

import math
import random
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Optional


@dataclass
class Observation:
    text: str
    info: dict[str, Any] = field(default_factory=dict)


@dataclass
class StepResult:
    observation: str
    reward: float
    done: bool
    info: dict[str, Any] = field(default_factory=dict)


class MalformedEnvOutput(TypeError):
    """The environment returned something that is not an Observation / StepResult of the right types."""


def validate_observation(obs: Any) -> Observation:
    if not isinstance(obs, Observation):
        raise MalformedEnvOutput(f"reset() must return Observation, got {type(obs).__name__}")
    if not isinstance(obs.text, str):
        raise MalformedEnvOutput(f"Observation.text must be str, got {type(obs.text).__name__}")
    if not isinstance(obs.info, dict):
        raise MalformedEnvOutput(f"Observation.info must be dict, got {type(obs.info).__name__}")
    return obs


def validate_step_result(res: Any) -> StepResult:
    if not isinstance(res, StepResult):
        raise MalformedEnvOutput(f"step() must return StepResult, got {type(res).__name__}")
    if not isinstance(res.observation, str):
        raise MalformedEnvOutput(f"StepResult.observation must be str, got {type(res.observation).__name__}")
    try:
        reward = float(res.reward)
    except (TypeError, ValueError):
        raise MalformedEnvOutput(f"StepResult.reward must be a number, got {res.reward!r}") from None
    if not math.isfinite(reward):
        raise MalformedEnvOutput(f"StepResult.reward must be finite, got {reward}")
    if not isinstance(res.done, bool):
        raise MalformedEnvOutput(f"StepResult.done must be bool, got {type(res.done).__name__}")
    if not isinstance(res.info, dict):
        raise MalformedEnvOutput(f"StepResult.info must be dict, got {type(res.info).__name__}")
    res.reward = reward
    return res


class Environment(ABC):
    """Base class of the project's environments. Subclasses register with :func:`register_env`."""

    name: ClassVar[str] = ""
    #: Instructions for the agent: what the task is and which actions exist (the agent loop adds the format).
    instructions: ClassVar[str] = ""

    @classmethod
    def prepare(cls, progress: bool = False, **env_kwargs: Any) -> None:
        """One-time setup before any worker builds the environment (generating or downloading its data). It runs
        in the calling process of ``verl-hindsight prepare-data`` and ``env-check``, outside the env workers'
        start-up time limit; a constructor that finds it missing raises naming that command. Takes the
        constructor's keyword arguments, is idempotent, and has nothing to do by default."""

    @abstractmethod
    def task_ids(self, split: str) -> list[str]:
        """Task ids of ``split`` ("train" or "val"), in a fixed, documented order."""

    @abstractmethod
    def reset(self, task_id: str) -> Observation:
        """Start the episode of ``task_id``."""

    @abstractmethod
    def step(self, action: str) -> StepResult:
        """Apply one (already parsed, non-empty) action."""

    def invalid_action(self, raw_text: str, reason: str) -> StepResult:
        """Answer to a malformed model action. Default: a step that changes nothing and says why."""
        return StepResult(
            observation=f"Invalid action ({reason}). Write exactly one action in the required format.",
            reward=0.0,
            done=False,
            info={"invalid_action": True, "error": reason},
        )

    def tools(self) -> Optional[list[dict]]:
        """OpenAI function schemas for tool-calling environments (rendered by the chat template); None for text.

        Tool-calling environments receive ``step(payload)`` with ``payload`` a JSON object
        ``{"content": str, "tool_calls": [{"name": str, "arguments": {...}}, ...]}``.
        """
        return None

    def oracle_action(self) -> Optional[str]:
        """The reference solution's next action (plain action text, or the tool-call payload), for
        ``env-check --policy oracle``."""
        return None

    def random_action(self, rng: random.Random) -> str:
        """A uniformly chosen admissible (or at least well-formed) action, for ``env-check --policy random``."""
        raise NotImplementedError(f"{type(self).__name__} has no random policy")

    def close(self) -> None:
        return None


_ENV_REGISTRY: dict[str, Callable[..., Environment]] = {}


def register_env(name: str):
    """Class decorator: ``@register_env("toy")``. A new benchmark is one module plus this line."""

    def decorator(cls):
        if name in _ENV_REGISTRY and _ENV_REGISTRY[name] is not cls:
            raise ValueError(f"environment {name!r} is already registered by {_ENV_REGISTRY[name]}")
        cls.name = name
        _ENV_REGISTRY[name] = cls
        return cls

    return decorator


# The built-in benchmark adapters (the top-level envs/ folder), imported on first use by name: a benchmark's
# optional dependencies are needed only by the users who pick it, and the protocol never imports an adapter.
_BUILTIN_ENV_MODULES = {
    "toy": "verl_hindsight.envs.toy",
    "bfcl": "verl_hindsight.envs.bfcl",
    "tau": "verl_hindsight.envs.tau",
    "alfworld": "verl_hindsight.envs.alfworld",
    "webshop": "verl_hindsight.envs.webshop",
    "appworld": "verl_hindsight.envs.appworld",
}


def env_class(name: str) -> type[Environment]:
    if name not in _ENV_REGISTRY and name in _BUILTIN_ENV_MODULES:
        import importlib

        importlib.import_module(_BUILTIN_ENV_MODULES[name])
    if name not in _ENV_REGISTRY:
        raise KeyError(f"unknown environment {name!r}; registered: {sorted(set(_ENV_REGISTRY) | set(_BUILTIN_ENV_MODULES))}")
    return _ENV_REGISTRY[name]


def make_env(name: str, **kwargs) -> Environment:
    return env_class(name)(**kwargs)


def prepare_env(name: str, env_kwargs: Optional[dict] = None, progress: bool = False) -> None:
    """Run ``name``'s one-time setup (:meth:`Environment.prepare`) here, with the kwargs its workers will get."""
    env_class(name).prepare(progress=progress, **(env_kwargs or {}))


def registered_envs() -> list[str]:
    return sorted(set(_ENV_REGISTRY) | set(_BUILTIN_ENV_MODULES))
