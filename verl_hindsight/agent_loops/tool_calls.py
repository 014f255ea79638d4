"""Hermes-style tool calls (``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``) at the text level.

verl's ``HermesToolParser`` turns a message into calls but drops a call it cannot decode (it only logs), and
reports no positions. The tool-calling agent loop uses this module to find where the calls are (their
character span is the turn's action span) and to detect malformed calls, so a bad call becomes a flagged
invalid action instead of silently vanishing. ``env-check`` uses it to parse the oracle's text the same way.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Optional

TOOL_CALL_RE = re.compile(r"<tool_call>(.*?)</tool_call>", re.DOTALL)
OPEN_TAG = "<tool_call>"


@dataclass(frozen=True)
class ToolCallParse:
    content: str  # the message text outside the calls
    calls: list[dict]  # [{"name": str, "arguments": dict}]
    error: Optional[str]  # None, "unparseable_tool_call", "truncated_action"
    char_span: Optional[tuple[int, int]]  # from the first call's "<tool_call>" to the last call's end


def parse_tool_calls(text: str, *, truncated: bool = False) -> ToolCallParse:
    blocks = list(TOOL_CALL_RE.finditer(text))
    content = TOOL_CALL_RE.sub("", text)
    tail_open = text.rfind(OPEN_TAG)
    unclosed = tail_open != -1 and (not blocks or tail_open > blocks[-1].start())
    if unclosed:
        span = (blocks[0].start() if blocks else tail_open, len(text))
        reason = "truncated_action" if truncated else "unparseable_tool_call"
        return ToolCallParse(content, [], reason, span)
    if not blocks:
        return ToolCallParse(content, [], None, None)
    calls = []
    for block in blocks:
        try:
            obj = json.loads(block.group(1))
        except json.JSONDecodeError:
            obj = None
        if not (isinstance(obj, dict) and isinstance(obj.get("name"), str) and isinstance(obj.get("arguments"), dict)):
            return ToolCallParse(content, [], "unparseable_tool_call", (blocks[0].start(), blocks[-1].end()))
        calls.append({"name": obj["name"], "arguments": obj["arguments"]})
    return ToolCallParse(content, calls, None, (blocks[0].start(), blocks[-1].end()))


def format_tool_calls(calls: list[dict], content: str = "") -> str:
    """How a policy without a model writes calls: the same Hermes text a model produces."""
    rendered = "".join(f"<tool_call>{json.dumps({'name': c['name'], 'arguments': c['arguments']})}</tool_call>"
                       for c in calls)
    return f"{content}{rendered}"


def display_calls(calls: list[dict]) -> str:
    """One line naming the calls, as trajectory records and feedback show them: ``name({"arg": ...}); ...``."""
    return "; ".join(f"{c['name']}({json.dumps(c['arguments'], sort_keys=True)})" for c in calls)


def tool_payload(content: str, calls: list[dict]) -> str:
    return json.dumps({"content": content, "tool_calls": calls}, sort_keys=True)
