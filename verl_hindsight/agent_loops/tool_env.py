"""``hindsight_tool_env``: tool-calling agent loop (BFCL / tau-bench style).

The environment declares its tools (OpenAI function schemas) and they are rendered by the model's chat
template; the model answers with tool calls in the format of ``actor_rollout_ref.rollout.multi_turn.format``
(verl's tool parsers; default ``hermes``). Tool results come back as ``tool`` messages. The action span of a
turn covers its tool calls; the free text around them keeps the plain advantage. An unparseable or truncated
call gets the environment's invalid-action observation and a flag on the turn, never an exception.
See :mod:`verl_hindsight.agent_loops.env_loop` for what every trajectory records.
"""

from __future__ import annotations

import json

from verl.experimental.agent_loop.agent_loop import register
from verl.experimental.agent_loop.tool_parser import ToolParser

from verl_hindsight.agent_loops.env_loop import EnvAgentLoopBase, TurnAction
from verl_hindsight.agent_loops.tool_calls import display_calls, parse_tool_calls, tool_payload

AGENT_NAME = "hindsight_tool_env"


@register(AGENT_NAME)
class ToolEnvAgentLoop(EnvAgentLoopBase):
    agent_name = AGENT_NAME

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.tool_format = self.rollout_config.multi_turn.format
        self.tool_parser = ToolParser.get_tool_parser(self.tool_format, self.tokenizer)
        self._tools = None

    def tools(self):
        return self._tools

    def initial_messages(self, instructions: str, first_observation: str) -> list[dict]:
        return [{"role": "system", "content": instructions}, {"role": "user", "content": first_observation}]

    async def parse_action(self, gen_ids, text: str, truncated: bool) -> TurnAction:
        content, calls = await self.tool_parser.extract_tool_calls(gen_ids, tools=None)
        located = parse_tool_calls(text, truncated=truncated) if self.tool_format == "hermes" else None
        if located is not None and located.error:
            return TurnAction(None, located.error, located.char_span, frozenset({located.error}))
        parsed_calls = []
        for call in calls:
            try:
                arguments = json.loads(call.arguments)
            except json.JSONDecodeError:
                return TurnAction(None, "unparseable_tool_call", located.char_span if located else None,
                                  frozenset({"unparseable_tool_call"}))
            parsed_calls.append({"name": call.name, "arguments": arguments})
        if located is not None and len(parsed_calls) != len(located.calls):  # verl's parser dropped a call
            return TurnAction(None, "unparseable_tool_call", located.char_span, frozenset({"unparseable_tool_call"}))
        span = located.char_span if located is not None else ((0, len(text)) if parsed_calls else None)
        display = display_calls(parsed_calls)
        return TurnAction(tool_payload(content, parsed_calls), None, span, frozenset(), display or content)

    def assistant_message(self, text: str, action: TurnAction) -> dict:
        if action.payload is None:
            return {"role": "assistant", "content": text}
        payload = json.loads(action.payload)
        message = {"role": "assistant", "content": payload["content"]}
        if payload["tool_calls"]:
            message["tool_calls"] = [{"type": "function", "function": c} for c in payload["tool_calls"]]
        return message

    def observation_messages(self, result) -> list[dict]:
        # An environment may answer as the user rather than as a tool (BFCL's next user turn, tau2's user):
        # info["observation_role"] = "user" renders it as a user message.
        role = "user" if result.info.get("observation_role") == "user" else "tool"
        return [{"role": role, "content": result.observation}]
