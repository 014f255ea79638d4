"""``verl-hindsight env-check``: play episodes with no model, through the training code path.

Episodes run in the same worker processes (:mod:`.runner`), with the same system prompt and the same action
parser (:func:`verl_hindsight.spans.parse_tagged_action`) the agent loop uses; only the policy differs:
- ``oracle``: the environment's reference next action, written as model text in the agent's format;
- ``random``: a uniformly chosen admissible action, written the same way.
Users run it before spending GPU hours on a new environment.
"""

from __future__ import annotations

import json
import random
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Optional

from verl_hindsight.agent_loops.prompts import initial_messages
from verl_hindsight.agent_loops.tool_calls import format_tool_calls, parse_tool_calls, tool_payload
from verl_hindsight.environment.protocol import prepare_env
from verl_hindsight.environment.runner import EnvFailure, RunnerLimits, get_pool
from verl_hindsight.spans import parse_tagged_action

POLICIES = ("oracle", "random")


@dataclass
class EpisodeReport:
    task_id: str
    success: bool = False
    turns: int = 0
    invalid_actions: int = 0
    reward: float = 0.0
    failure: Optional[str] = None
    transcript: list = field(default_factory=list)  # the messages the agent would see and write


def format_action(action: str, tag: str = "action") -> str:
    """How a policy without a model writes its action: the same shape a model's answer has."""
    return f"<{tag}>{action}</{tag}>"


def write_action(action: str, tool_env: bool, tag: str = "action") -> str:
    """A policy's action (plain text, or a tool payload) as the model text that carries it."""
    if tool_env:
        payload = json.loads(action)
        return format_tool_calls(payload["tool_calls"], payload.get("content", ""))
    return format_action(action, tag)


def _write_and_parse(action: str, tool_env: bool, tag: str) -> tuple[str, Optional[str], Optional[str]]:
    """Policy action -> model text in the agent's format -> (text, payload or None, parse error)."""
    text = write_action(action, tool_env, tag)
    if tool_env:
        parsed = parse_tool_calls(text)
        return text, (None if parsed.error else tool_payload(parsed.content, parsed.calls)), parsed.error
    parsed = parse_tagged_action(text, tag)
    return text, parsed.text, parsed.error


def play_episode(pool, task_id: str, policy: str, seed: int, max_turns: int, tag: str = "action") -> EpisodeReport:
    report = EpisodeReport(task_id)
    rng = random.Random(seed)
    with pool.session() as session:
        try:
            obs = session.reset(task_id)
            tool_env = session.tools() is not None
            report.transcript.extend(initial_messages(session.instructions(), obs.text, tag))
            for _ in range(max_turns):
                if policy == "oracle":
                    action = session.oracle_action()
                    if action is None:
                        raise EnvFailure("no_oracle", "the environment has no reference action in this state")
                else:
                    action = session.random_action(rng.randrange(1 << 30))
                text, payload, error = _write_and_parse(action, tool_env, tag)
                if payload is None:
                    result = session.invalid_action(text, error)
                else:
                    result = session.step(payload)
                report.turns += 1
                report.reward += result.reward
                report.invalid_actions += int(bool(result.info.get("invalid_action")))
                report.transcript += [{"role": "assistant", "content": text},
                                      {"role": "user", "content": result.observation}]
                if result.done:
                    report.success = bool(result.info.get("success", False))
                    break
        except EnvFailure as exc:
            report.failure = exc.reason
    return report


def run_env_check(env_name: str, policy: str = "oracle", tasks: int = 20, workers: int = 1, split: str = "val",
                  env_kwargs: Optional[dict] = None, seed: int = 0, max_turns: int = 50,
                  limits: RunnerLimits = RunnerLimits()) -> list[EpisodeReport]:
    if policy not in POLICIES:
        raise ValueError(f"env-check: --policy must be one of {POLICIES}, got {policy!r}")
    prepare_env(env_name, env_kwargs, progress=True)  # one-time data, here rather than in a time-limited worker
    pool = get_pool(env_name, env_kwargs or {}, limits)
    with pool.session() as session:
        task_ids = session.task_ids(split)[:tasks]
    with ThreadPoolExecutor(max_workers=max(1, workers)) as executor:
        reports = list(executor.map(
            lambda it: play_episode(pool, it[1], policy, seed + it[0], max_turns), enumerate(task_ids)))
    return reports


def summarize(reports: list[EpisodeReport]) -> str:
    n = len(reports)
    successes = sum(r.success for r in reports)
    turns = sum(r.turns for r in reports)
    invalid = sum(r.invalid_actions for r in reports)
    failures = Counter(r.failure for r in reports if r.failure)
    lines = [
        f"episodes: {n}",
        f"success rate: {successes / max(n, 1):.3f}",
        f"mean return: {sum(r.reward for r in reports) / max(n, 1):.3f}",
        f"mean turns: {turns / max(n, 1):.2f}",
        f"invalid-action rate: {invalid / max(turns, 1):.3f}",
        "failures: " + (", ".join(f"{k}={v}" for k, v in sorted(failures.items())) or "none"),
        f"success: {successes}/{n}",
    ]
    return "\n".join(lines)
