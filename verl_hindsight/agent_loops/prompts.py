"""Prompt rendering shared by the text-action agent loop and ``env-check``."""

from __future__ import annotations

from verl_hindsight.config import DEFAULT_FORMAT_INSTRUCTIONS


def system_prompt(instructions: str, tag: str = "action", format_instructions: str = DEFAULT_FORMAT_INSTRUCTIONS) -> str:
    """The environment's task instructions followed by the action-format instruction."""
    return f"{instructions}\n{format_instructions.format(tag=tag)}".strip()


def initial_messages(instructions: str, first_observation: str, tag: str = "action",
                     format_instructions: str = DEFAULT_FORMAT_INSTRUCTIONS) -> list[dict]:
    return [{"role": "system", "content": system_prompt(instructions, tag, format_instructions)},
            {"role": "user", "content": first_observation}]
