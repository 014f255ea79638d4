"""``hindsight_text_env``: text-action agent loop (ALFWorld/WebShop style).

The model reasons, then writes its action inside a configurable tag (``<action>...</action>`` by default,
``hindsight.env.action_tag``); reasoning and format tokens are not part of the action span. Environment
observations come back as user messages. A message without a valid action (no tag, empty, truncated) gets the
environment's invalid-action observation and the turn is flagged; it never raises.
See :mod:`verl_hindsight.agent_loops.env_loop` for what every trajectory records.
"""

from __future__ import annotations

from verl.experimental.agent_loop.agent_loop import register

from verl_hindsight.agent_loops.env_loop import EnvAgentLoopBase, TurnAction
from verl_hindsight.agent_loops.prompts import initial_messages
from verl_hindsight.spans import parse_tagged_action

AGENT_NAME = "hindsight_text_env"


@register(AGENT_NAME)
class TextEnvAgentLoop(EnvAgentLoopBase):
    agent_name = AGENT_NAME

    def initial_messages(self, instructions: str, first_observation: str) -> list[dict]:
        return initial_messages(instructions, first_observation, self.settings.action_tag,
                                self.settings.format_instructions)

    async def parse_action(self, gen_ids, text: str, truncated: bool) -> TurnAction:
        # The message text keeps special tokens (offsets must match the ids), so an unclosed action would run into
        # the end-of-turn token; stop it there.
        parsed = parse_tagged_action(text, self.settings.action_tag, truncated=truncated,
                                     end_markers=(self.tokenizer.eos_token,) if self.tokenizer.eos_token else ())
        return TurnAction(payload=parsed.text, error=parsed.error, char_span=parsed.char_span, flags=parsed.flags)

    def observation_messages(self, result) -> list[dict]:
        return [{"role": "user", "content": result.observation}]
