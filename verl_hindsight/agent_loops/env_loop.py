"""Shared machinery of the plugin's multi-turn environment agent loops.

An episode: reset the environment (in a worker process, :mod:`verl_hindsight.environment.runner`), render the first
prompt with the model's chat template, then per turn: generate, parse the action (subclass hook), step the
environment (or give it the malformed action), append the observation as context messages (mask 0), until the
episode ends, the turn limit, or the ``response_length`` budget.

Per trajectory it emits, next to verl's usual fields:
- ``action_mask`` (tensor aligned to the response): 1 exactly on the tokens of each turn's action, the one record
  of which tokens are actions;
- ``extra_fields["hs_turns"]``: one record per turn (:func:`turn_record`): the response token span of the whole
  assistant message, whether it holds an action, the observation the action answered, the environment's
  feedback/error, the next observation, the step reward, and flags (invalid action, truncated, clipped);
- ``extra_fields["hs_env"]``: environment name, task id, success, episode return, turns, invalid actions, and
  ``failure`` (the reason when the environment crashed, hung or returned malformed data; then reward 0);
  ``extra_fields["hs_last_row"]`` marks the episode's last row (history mode splits an episode into rows).

With ``hindsight.env.history_turns=K`` each turn instead gets a fresh prompt showing only the last K steps and
becomes its own training row (a list output; verl's GRPO broadcasts the episode advantage to every row).

The episode return (sum of step rewards) is the trajectory's ``reward_score``, so verl's reward loop is not
used. Environment failures never raise out of the loop: the trajectory is kept, marked failed, scored 0.

Dataset rows carry ``extra_info={"env": name, "env_kwargs": json, "task_id": ...}`` (``verl-hindsight
prepare-data``). Loop settings come from the ``hindsight.env`` config block, overridable per loop in an
``agent_loop_config_path`` yaml entry (:class:`verl_hindsight.config.EnvLoopConfig`).
"""

from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import dataclass, fields
from typing import Any, Optional
from uuid import uuid4

import torch
from verl.experimental.agent_loop.agent_loop import AgentLoopBase, AgentLoopOutput

from verl_hindsight.agent_loops.hindsight_answers import answer_episode, answer_fn
from verl_hindsight.config import EnvLoopConfig, check_trainer_mode, load_env_loop_config, load_hindsight_config
from verl_hindsight.environment.runner import EnvFailure, RunnerLimits, get_pool

logger = logging.getLogger(__name__)


@dataclass
class TurnAction:
    """What a subclass parsed from one assistant message."""

    payload: Optional[str]  # what to send to env.step; None = malformed
    error: Optional[str]  # why it is malformed
    char_span: Optional[tuple[int, int]]  # the action's characters in the decoded message
    flags: frozenset[str] = frozenset()
    display: Optional[str] = None  # human-readable action for the records


def _cut_reason(episode_over: bool, turns: int, max_turns: int) -> str:
    """Why the loop stopped an episode the environment had not ended: "" (it had ended, or the env failed),
    "max_turns", or "response_length" (the token budget ran out first). A cut episode's return holds only the
    steps taken, so a budget too small for a whole episode caps what any policy can earn."""
    if episode_over:
        return ""
    return "max_turns" if turns >= max_turns else "response_length"


def new_summary(env_name: str, task_id: str) -> dict[str, Any]:
    return {"env": env_name, "task_id": task_id, "success": False, "return": 0.0, "turns": 0, "invalid_actions": 0,
            "failure": "", "failure_detail": "", "cut": ""}


class HindsightAgentLoopOutput(AgentLoopOutput):
    """verl's AgentLoopOutput plus the per-token action mask (V1 path: ``as_dict`` -> TransferQueue)."""

    action_mask: list[int]

    def as_dict(self) -> dict[str, Any]:
        action_mask = self.action_mask
        output = super().as_dict()
        output["action_mask"] = torch.tensor(action_mask, dtype=torch.int64)
        return output


def turn_record(index: int, response_span: tuple[int, int], action_span: Optional[tuple[int, int]],
                action: TurnAction, context_observation: str, anchor: str, result, *,
                truncated: bool) -> dict[str, Any]:
    info = result.info if result is not None else {}
    return {
        "turn": index,
        "response_span": list(response_span),  # [start, end) response positions of the whole assistant message
        # [start, end) of the action's tokens: _build_output turns it into the row's action_mask (the one record
        # of which tokens are the action) and drops it, keeping has_action (false if the length limit cut it off)
        "action_span": list(action_span) if action_span else None,
        "has_action": action_span is not None,
        "action": action.display if action.display is not None else action.payload,
        "parse_error": action.error,
        "flags": sorted(action.flags),
        "observation": context_observation,  # what the model saw before acting
        "anchor": anchor,  # raw observation before the action: the anchor-level grouping key
        "feedback": info.get("error") or (result.observation if result is not None else ""),
        "error": info.get("error"),
        "next_observation": result.observation if result is not None else "",
        "reward": float(result.reward) if result is not None else 0.0,
        "done": bool(result.done) if result is not None else True,
        "invalid_action": bool(info.get("invalid_action", action.payload is None)),
        "truncated": truncated,
    }


_ENV_LOOP_KEYS = {f.name for f in fields(EnvLoopConfig)} - {"_target_"}
_settings_cache: dict = {}


def _loop_settings(config, overrides: dict[str, Any]):
    """(``hindsight.env`` with the loop's overrides, ``hindsight.analyzer``), parsed once per worker config: verl
    builds an agent loop per sample."""
    key = (id(config), json.dumps(overrides, sort_keys=True, default=str))
    if key not in _settings_cache:  # the entry holds the config, so its id cannot be reused by another object
        settings = load_hindsight_config(config, validate=False)
        # the first episode of a run: the earliest point plugin code sees the config under verl's own trainers
        check_trainer_mode(config, settings)
        _settings_cache[key] = (config, load_env_loop_config(config, overrides), settings.analyzer)
    return _settings_cache[key][1:]


class EnvAgentLoopBase(AgentLoopBase):
    """Subclasses implement :meth:`initial_messages`, :meth:`parse_action` and :meth:`observation_messages`."""

    agent_name = ""

    def __init__(self, *args, **kwargs):
        overrides = {k: kwargs.pop(k) for k in list(kwargs) if k in _ENV_LOOP_KEYS}
        super().__init__(*args, **kwargs)
        self.settings, self.answer_settings = _loop_settings(self.config, overrides)
        self.response_length = self.rollout_config.response_length
        self.eos_token_id = self.tokenizer.eos_token_id

    # ------------------------------------------------------------------ subclass hooks
    def initial_messages(self, instructions: str, first_observation: str) -> list[dict]:
        raise NotImplementedError

    def tools(self) -> Optional[list[dict]]:
        return None

    async def parse_action(self, gen_ids: list[int], text: str, truncated: bool) -> TurnAction:
        raise NotImplementedError

    def observation_messages(self, result) -> list[dict]:
        raise NotImplementedError

    def assistant_message(self, text: str, action: TurnAction) -> dict:
        return {"role": "assistant", "content": text}

    # ------------------------------------------------------------------ episode
    async def run(self, sampling_params: dict[str, Any], **kwargs) -> AgentLoopOutput:
        extra_info = dict(kwargs.get("extra_info") or {})
        missing = [k for k in ("env", "task_id") if k not in extra_info]
        if missing:
            raise ValueError(
                f"{self.agent_name}: dataset row extra_info lacks {missing}; build the data with "
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
        summary = new_summary(env_name, task_id)
        try:
            try:
                instructions, obs = await self._reset(session, task_id)
            except EnvFailure as exc:
                summary.update(failure=exc.reason, failure_detail=exc.detail)
                return await self._failed_before_start(summary, bool(sampling_params.get("logprobs")))
            episode = self._run_windowed_episode if s.history_turns else self._run_episode
            return await episode(session, sampling_params, summary, instructions, obs)
        finally:
            await asyncio.to_thread(session.close)

    async def _reset(self, session, task_id: str):
        instructions = await asyncio.to_thread(session.instructions)
        obs = await asyncio.to_thread(session.reset, task_id)
        # after reset: a benchmark's tools can depend on the task (BFCL declares each task's functions)
        self._tools = await asyncio.to_thread(session.tools)
        return instructions, obs

    def _action_span(self, gen_ids: list[int], action: TurnAction, offset: int) -> Optional[tuple[int, int]]:
        """Token span of the action in the response (``offset`` = where the message starts)."""
        if action.char_span is None or action.char_span[1] <= action.char_span[0]:
            return None
        from verl_hindsight.spans import char_span_to_token_span

        a, b = char_span_to_token_span(self.tokenizer, gen_ids, *action.char_span)
        return offset + a, offset + b

    async def _act(self, session, text: str, action: TurnAction, summary: dict):
        """Step the environment with the action (or hand it the malformed message); never raises.

        Returns ``(result, episode_over)``; ``result`` is None when the environment failed (reason in ``summary``).
        """
        try:
            if action.payload is None:
                result = await asyncio.to_thread(session.invalid_action, text, action.error or "malformed")
            else:
                result = await asyncio.to_thread(session.step, action.payload)
        except EnvFailure as exc:
            summary.update(failure=exc.reason, failure_detail=exc.detail)
            return None, True
        summary["return"] += result.reward
        summary["invalid_actions"] += int(bool(result.info.get("invalid_action")))
        if result.done:
            summary["success"] = bool(result.info.get("success", False))
        return result, result.done

    async def _run_episode(self, session, sampling_params, summary, instructions, obs) -> AgentLoopOutput:
        s = self.settings
        with_logprobs = bool(sampling_params.get("logprobs"))

        messages = self.initial_messages(instructions, obs.text)
        prompt_ids = await self.ct_build_initial_tokens(messages, tools=self.tools())
        runtime_ids = list(prompt_ids)
        response_mask: list[int] = []
        response_logprobs: Optional[list[float]] = [] if with_logprobs else None
        request_id = uuid4().hex
        context_obs, anchor = obs.text, obs.info.get("anchor", obs.text)
        turns: list[dict[str, Any]] = []
        steps_seen: list[Any] = []

        over = False
        for index in range(s.max_turns):
            budget = self.response_length - len(response_mask)
            if budget <= 0:
                break
            out = await self.server_manager.generate(request_id=request_id, prompt_ids=runtime_ids,
                                                     sampling_params=dict(sampling_params, max_tokens=budget))
            steps_seen.append(out.extra_fields.get("global_steps"))
            gen_ids = list(out.token_ids)
            truncated = len(gen_ids) >= budget and (not gen_ids or gen_ids[-1] != self.eos_token_id)
            merge, response_mask, response_logprobs = await self.ct_merge_assistant_token(
                runtime_ids, gen_ids, response_mask, response_logprobs,
                assistant_logprobs=list(out.log_probs) if with_logprobs else None,
            )
            runtime_ids = merge.token_ids
            msg_end = len(response_mask)
            msg_start = msg_end - merge.appended_token_count
            text = self.tokenizer.decode(gen_ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
            action = await self.parse_action(gen_ids, text, truncated)
            action_span = self._action_span(gen_ids, action, msg_start)
            result, over = await self._act(session, text, action, summary)
            turns.append(turn_record(index, (msg_start, msg_end), action_span, action, context_obs, anchor, result,
                                     truncated=truncated))
            if over or truncated or len(response_mask) >= self.response_length:
                break
            # The observation becomes context (mask 0), rendered by the chat template.
            previous = messages + [self.assistant_message(text, action)]
            messages = previous + self.observation_messages(result)
            merge, response_mask, response_logprobs = await self.ct_merge_context_msg(
                previous, messages, runtime_ids, response_mask, response_logprobs, tools=self.tools())
            runtime_ids = merge.token_ids
            context_obs = result.observation
            anchor = result.info.get("anchor", result.observation)

        summary["turns"] = len(turns)
        summary["cut"] = _cut_reason(over, len(turns), s.max_turns)
        known_steps = [x for x in steps_seen if x is not None]
        answers = await self._answer(turns, summary)
        return self._build_output(prompt_ids, runtime_ids, response_mask, response_logprobs, turns, summary,
                                  min(known_steps) if known_steps else None, max(known_steps) if known_steps else None,
                                  answers=answers)

    async def _answer(self, turns: list[dict], summary: dict) -> dict[str, Any]:
        """The analyzer's / reflector's reading of the finished episode (``hindsight.analyzer``), if enabled."""
        if self.answer_settings.role == "none" or summary["failure"]:
            return {}
        fn = answer_fn(self.answer_settings, self.tokenizer, self.server_manager)
        return await answer_episode(self.answer_settings, fn, turns, summary)

    def render_window(self, history: list[tuple[str, str]], observation: str) -> str:
        """The observation shown in history mode: the last K (observation, action) steps, then the current one."""
        if not history:
            return observation
        lines = [f"Your last {len(history)} step(s):"]
        for obs, action in history:
            lines += [f"Observation: {obs}", f"Action: {action}"]
        lines.append(f"Current observation: {observation}")
        return "\n".join(lines)

    async def _run_windowed_episode(self, session, sampling_params, summary, instructions, obs):
        """History mode: one training row per turn, each with a freshly rendered prompt (list output)."""
        s = self.settings
        with_logprobs = bool(sampling_params.get("logprobs"))
        history: list[tuple[str, str]] = []
        observation, anchor = obs.text, obs.info.get("anchor", obs.text)
        rows = []
        over = False
        for index in range(s.max_turns):
            shown = self.render_window(history[-s.history_turns:], observation)
            prompt_ids = await self.ct_build_initial_tokens(self.initial_messages(instructions, shown),
                                                            tools=self.tools())
            out = await self.server_manager.generate(request_id=uuid4().hex, prompt_ids=prompt_ids,
                                                     sampling_params=dict(sampling_params,
                                                                          max_tokens=self.response_length))
            gen_ids = list(out.token_ids)[: self.response_length]
            truncated = len(gen_ids) >= self.response_length and (not gen_ids or gen_ids[-1] != self.eos_token_id)
            text = self.tokenizer.decode(gen_ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
            action = await self.parse_action(gen_ids, text, truncated)
            action_span = self._action_span(gen_ids, action, 0)
            result, over = await self._act(session, text, action, summary)
            record = turn_record(index, (0, len(gen_ids)), action_span, action, observation, anchor, result,
                                 truncated=truncated)
            logprobs = list(out.log_probs)[: len(gen_ids)] if with_logprobs else None
            rows.append((prompt_ids, gen_ids, logprobs, record, out.extra_fields.get("global_steps")))
            if over:
                break
            history.append((observation, action.display or action.payload or text))
            observation, anchor = result.observation, result.info.get("anchor", result.observation)
        summary["turns"] = len(rows)
        summary["cut"] = _cut_reason(over, len(rows), s.max_turns)
        answers = await self._answer([r[3] for r in rows], summary)
        outputs = []
        for k, (prompt_ids, gen_ids, logprobs, record, steps) in enumerate(rows):
            # every row carries the whole episode's summary; GRPO broadcasts the episode advantage to all rows
            # every row carries the answers too: a row's trajectory view holds only its own turn
            outputs.append(self._build_output(prompt_ids, list(prompt_ids) + gen_ids, [1] * len(gen_ids), logprobs,
                                              [record], summary, steps, steps, last_row=k == len(rows) - 1,
                                              answers=answers))
        return outputs

    def _build_output(self, prompt_ids, runtime_ids, response_mask, response_logprobs, turns, summary,
                      min_steps, max_steps, last_row: bool = True,
                      answers: Optional[dict[str, Any]] = None) -> AgentLoopOutput:
        limit = self.response_length
        response_ids = runtime_ids[len(prompt_ids):]
        if len(response_ids) != len(response_mask):
            raise RuntimeError(f"{self.agent_name}: response ids ({len(response_ids)}) and mask "
                               f"({len(response_mask)}) diverged; this is a bug in the loop")
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
            a, b = t.pop("action_span") or (0, 0)
            for i in range(a, b):
                action_mask[i] = int(response_mask[i] == 1)
            t["has_action"] = any(action_mask[a:b])
        reward = 0.0 if summary["failure"] else float(summary["return"])
        extra = {"hs_turns": turns, "hs_env": dict(summary), "hs_last_row": last_row, "min_global_steps": min_steps,
                 "max_global_steps": max_steps, "turn_scores": [], "tool_rewards": [],
                 # verl reads this from the final row of a multi-row episode when the loop sets reward_score itself;
                 # its keys become validation metrics (val-aux/<data_source>/success/mean@N)
                 "reward_extra_info": {"success": float(bool(summary["success"]) and not summary["failure"])},
                 # analyzer / reflector answers (hindsight.analyzer); same keys on every row
                 "hs_analysis": None, "hs_reflection": None}
        extra.update(answers or {})
        return HindsightAgentLoopOutput(
            prompt_ids=list(prompt_ids), response_ids=response_ids, response_mask=response_mask,
            response_logprobs=response_logprobs, reward_score=reward, num_turns=2 * len(turns), metrics={},
            extra_fields=extra, action_mask=action_mask,
        )

    async def _failed_before_start(self, summary, with_logprobs: bool) -> AgentLoopOutput:
        """The environment failed at reset: keep the sample (reward 0), marked failed, with nothing to learn:
        its single response token has mask 0. Never dropped."""
        messages = [{"role": "user", "content": f"(environment failure: {summary['failure']})"}]
        prompt_ids = await self.ct_build_initial_tokens(messages)
        return self._build_output(prompt_ids, list(prompt_ids) + [self.eos_token_id], [0],
                                  [0.0] if with_logprobs else None, [], summary, None, None)
