"""``hindsight_text_env``: a multi-turn text-action agent loop that records every turn's action span.

For ALFWorld/WebShop-style environments: the model reasons, then writes its action inside a tag
(``<action>...</action>`` by default). Each environment observation is appended as a user message with the
model's chat template (verl's Continuous Token builder, so tokens match verl's own tool loop); observation
tokens get ``response_mask`` 0.

Per trajectory the loop emits, next to verl's usual fields:
- ``action_mask`` (tensor aligned to the response): 1 exactly on the tokens of each turn's action text;
- ``extra_fields["hs_turns"]``: one record per turn (see :func:`turn_record`): the response token span of the
  whole assistant message, the action sub-span, the observation the action answered, the environment's
  feedback/error, the next observation, the step reward, and flags (invalid action, truncated, clipped);
- ``extra_fields["hs_env"]``: environment name, task id, success, episode return, number of turns, invalid
  actions, and ``failure`` (the reason when the environment crashed, hung or returned malformed data).

The episode reward (sum of step rewards) is the trajectory's ``reward_score``, so verl's reward loop is not
needed. Environment failures never raise out of the loop: the trajectory is kept, marked failed, and scored 0.

Dataset rows select this loop with ``agent_name=hindsight_text_env`` and carry
``extra_info={"env": name, "env_kwargs": {...}, "task_id": ...}`` (see ``verl-hindsight prepare-data``).
Loop settings come from the ``hindsight.env`` config block (or the agent-loop yaml entry), see
:class:`TextEnvSettings`.
"""

from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import dataclass, fields
from typing import Any, Optional
from uuid import uuid4

import torch
from verl.experimental.agent_loop.agent_loop import AgentLoopBase, AgentLoopOutput, register

from verl_hindsight.agent_loops.prompts import DEFAULT_FORMAT_INSTRUCTIONS, initial_messages
from verl_hindsight.envs.runner import EnvFailure, RunnerLimits, get_pool
from verl_hindsight.spans import char_span_to_token_span, parse_tagged_action

logger = logging.getLogger(__name__)

AGENT_NAME = "hindsight_text_env"


@dataclass(frozen=True)
class TextEnvSettings:
    action_tag: str = "action"
    max_turns: int = 20
    step_timeout_s: float = 30.0
    episode_timeout_s: float = 600.0
    format_instructions: str = DEFAULT_FORMAT_INSTRUCTIONS
    env_modules: tuple[str, ...] = ()  # extra modules to import in env workers (user-registered environments)

    @classmethod
    def from_config(cls, config, overrides: dict[str, Any]) -> "TextEnvSettings":
        known = {f.name for f in fields(cls)}
        block = {}
        hindsight = config.get("hindsight", None) if hasattr(config, "get") else None
        if hindsight is not None and hindsight.get("env", None) is not None:
            block = dict(hindsight.get("env"))
        block.update({k: v for k, v in overrides.items() if k in known})
        unknown = set(block) - known
        if unknown:
            raise ValueError(f"hindsight.env: unknown keys {sorted(unknown)}; known: {sorted(known)}")
        if "env_modules" in block:
            block["env_modules"] = tuple(block["env_modules"] or ())
        return cls(**block)


class HindsightAgentLoopOutput(AgentLoopOutput):
    """verl's AgentLoopOutput plus the per-token action mask (V1 trainer path: ``as_dict`` -> TransferQueue)."""

    action_mask: list[int]

    def as_dict(self) -> dict[str, Any]:
        action_mask = self.action_mask
        output = super().as_dict()
        output.pop("action_mask", None)
        output["action_mask"] = torch.tensor(action_mask, dtype=torch.int64)
        return output


def turn_record(index: int, response_span: tuple[int, int], action_span: Optional[tuple[int, int]],
                parsed, context_observation: str, anchor: str, result, *, truncated: bool) -> dict[str, Any]:
    info = result.info if result is not None else {}
    return {
        "turn": index,
        "response_span": list(response_span),  # [start, end) in response token positions: the whole message
        "action_span": list(action_span) if action_span else None,  # [start, end): the action text's tokens
        "action": parsed.text,
        "parse_error": parsed.error,
        "flags": sorted(parsed.flags),
        "observation": context_observation,  # what the model saw before acting
        "feedback": info.get("error") or (result.observation if result is not None else ""),
        "error": info.get("error"),
        "next_observation": result.observation if result is not None else "",
        "anchor": anchor,  # raw observation before the action: anchor-level grouping key
        "reward": float(result.reward) if result is not None else 0.0,
        "done": bool(result.done) if result is not None else True,
        "invalid_action": bool(info.get("invalid_action", parsed.text is None)),
        "truncated": truncated,
    }


@register(AGENT_NAME)
class TextEnvAgentLoop(AgentLoopBase):
    def __init__(self, *args, **kwargs):
        overrides = {k: kwargs.pop(k) for k in list(kwargs) if k in {f.name for f in fields(TextEnvSettings)}}
        super().__init__(*args, **kwargs)
        self.settings = TextEnvSettings.from_config(self.config, overrides)
        self.response_length = self.rollout_config.response_length
        self.eos_token_id = self.tokenizer.eos_token_id

    async def run(self, sampling_params: dict[str, Any], **kwargs) -> AgentLoopOutput:
        extra_info = dict(kwargs.get("extra_info") or {})
        missing = [k for k in ("env", "task_id") if k not in extra_info]
        if missing:
            raise ValueError(
                f"{AGENT_NAME}: dataset row extra_info lacks {missing}; build the data with "
                "`verl-hindsight prepare-data ENV` (rows need extra_info.env and extra_info.task_id)"
            )
        env_name, task_id = extra_info["env"], str(extra_info["task_id"])
        env_kwargs = extra_info.get("env_kwargs") or {}
        env_kwargs = json.loads(env_kwargs) if isinstance(env_kwargs, str) else dict(env_kwargs)
        s = self.settings
        pool = get_pool(env_name, env_kwargs,
                        RunnerLimits(step_timeout_s=s.step_timeout_s, episode_timeout_s=s.episode_timeout_s),
                        s.env_modules)
        session = await asyncio.to_thread(pool.session)
        try:
            return await self._run_episode(session, sampling_params, env_name, task_id)
        finally:
            await asyncio.to_thread(session.close)

    async def _run_episode(self, session, sampling_params, env_name: str, task_id: str) -> AgentLoopOutput:
        s = self.settings
        env_summary = {"env": env_name, "task_id": task_id, "success": False, "return": 0.0, "turns": 0,
                       "invalid_actions": 0, "failure": "", "failure_detail": ""}
        turns: list[dict[str, Any]] = []
        try:
            instructions = await asyncio.to_thread(session.instructions)
            obs = await asyncio.to_thread(session.reset, task_id)
        except EnvFailure as exc:
            env_summary.update(failure=exc.reason, failure_detail=exc.detail)
            return await self._failed_before_start(env_summary, with_logprobs=bool(sampling_params.get("logprobs")))

        messages = initial_messages(instructions, obs.text, s.action_tag, s.format_instructions)
        prompt_ids = await self.ct_build_initial_tokens(messages)
        runtime_ids = list(prompt_ids)
        response_mask: list[int] = []
        response_logprobs: Optional[list[float]] = [] if sampling_params.get("logprobs") else None
        request_id = uuid4().hex
        context_obs, anchor = obs.text, obs.info.get("anchor", obs.text)
        min_steps = max_steps = None
        total_reward = 0.0

        for index in range(s.max_turns):
            budget = self.response_length - len(response_mask)
            if budget <= 0:
                break
            params = dict(sampling_params, max_tokens=budget)
            out = await self.server_manager.generate(request_id=request_id, prompt_ids=runtime_ids,
                                                     sampling_params=params)
            steps = out.extra_fields.get("global_steps")
            min_steps = steps if min_steps is None else min_steps
            max_steps = steps
            gen_ids = list(out.token_ids)
            hit_limit = len(gen_ids) >= budget and (not gen_ids or gen_ids[-1] != self.eos_token_id)
            merge, response_mask, response_logprobs = await self.ct_merge_assistant_token(
                runtime_ids, gen_ids, response_mask, response_logprobs,
                assistant_logprobs=list(out.log_probs) if response_logprobs is not None else None,
            )
            runtime_ids = merge.token_ids
            msg_end = len(response_mask)
            msg_start = msg_end - merge.appended_token_count
            text = self.tokenizer.decode(gen_ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
            parsed = parse_tagged_action(text, s.action_tag, truncated=hit_limit)
            action_span = None
            if parsed.char_span is not None and parsed.char_span[1] > parsed.char_span[0]:
                a, b = char_span_to_token_span(self.tokenizer, gen_ids, *parsed.char_span)
                action_span = (msg_start + a, msg_start + b)

            result, failure = None, None
            try:
                if parsed.text is None:
                    result = await asyncio.to_thread(session.invalid_action, text, parsed.error)
                else:
                    result = await asyncio.to_thread(session.step, parsed.text)
            except EnvFailure as exc:
                failure = exc
            if result is not None:
                total_reward += result.reward
                env_summary["invalid_actions"] += int(bool(result.info.get("invalid_action")))
            turns.append(turn_record(index, (msg_start, msg_end), action_span, parsed, context_obs, anchor, result,
                                     truncated=hit_limit))
            if failure is not None:
                env_summary.update(failure=failure.reason, failure_detail=failure.detail)
                break
            if result.done:
                env_summary["success"] = bool(result.info.get("success", False))
                break
            if hit_limit or len(response_mask) >= self.response_length:
                break
            # The observation becomes the next user turn (mask 0), rendered by the chat template.
            previous = messages + [{"role": "assistant", "content": text}]
            messages = previous + [{"role": "user", "content": result.observation}]
            merge, response_mask, response_logprobs = await self.ct_merge_context_msg(
                previous, messages, runtime_ids, response_mask, response_logprobs)
            runtime_ids = merge.token_ids
            context_obs = result.observation
            anchor = result.info.get("anchor", result.observation)

        env_summary.update(turns=len(turns), **{"return": total_reward})
        return self._build_output(prompt_ids, runtime_ids, response_mask, response_logprobs, turns, env_summary,
                                  min_steps, max_steps)

    def _build_output(self, prompt_ids, runtime_ids, response_mask, response_logprobs, turns, env_summary,
                      min_steps, max_steps) -> AgentLoopOutput:
        limit = self.response_length
        response_ids = runtime_ids[len(prompt_ids):]
        if len(response_ids) != len(response_mask):
            raise RuntimeError(f"{AGENT_NAME}: response ids ({len(response_ids)}) and mask ({len(response_mask)}) "
                               "diverged; this is a bug in the loop")
        response_ids, response_mask = response_ids[:limit], response_mask[:limit]
        if response_logprobs is not None:
            response_logprobs = response_logprobs[:limit]
        action_mask = [0] * len(response_ids)
        for t in turns:
            for key in ("response_span", "action_span"):
                span = t[key]
                if span is not None and span[1] > limit:  # cut by the response length limit
                    t[key] = [min(span[0], limit), limit]
                    t["flags"] = sorted(set(t["flags"]) | {"clipped"})
            if t["action_span"] is not None:
                a, b = t["action_span"]
                for i in range(a, b):
                    action_mask[i] = 1 if response_mask[i] else 0
        reward = 0.0 if env_summary["failure"] else float(env_summary["return"])
        extra = {"hs_turns": turns, "hs_env": env_summary, "min_global_steps": min_steps,
                 "max_global_steps": max_steps, "turn_scores": [], "tool_rewards": []}
        return HindsightAgentLoopOutput(
            prompt_ids=list(prompt_ids),
            response_ids=response_ids,
            response_mask=response_mask,
            response_logprobs=response_logprobs,
            reward_score=reward,
            num_turns=2 * len(turns),
            metrics={},
            extra_fields=extra,
            action_mask=action_mask,
        )

    async def _failed_before_start(self, env_summary, with_logprobs: bool) -> AgentLoopOutput:
        """The environment failed at reset: keep the sample (reward 0, nothing to learn from), marked failed.

        Its single response token has mask 0, so it contributes no gradient, but it is never dropped.
        """
        messages = [{"role": "user", "content": f"(environment failure: {env_summary['failure']})"}]
        prompt_ids = await self.ct_build_initial_tokens(messages)
        return self._build_output(prompt_ids, list(prompt_ids) + [self.eos_token_id], [0],
                                  [0.0] if with_logprobs else None, [], env_summary, None, None)
