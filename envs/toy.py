"""``toy``: a key-and-door corridor that needs multi-step credit assignment and trains on CPU in minutes.

The agent walks a corridor of ``n_doors`` doors. Each door has one of ``n_colours`` colours; exactly one of the
keys A.. opens it, and which one depends only on the colour through a hidden colour->key rule (a permutation
fixed by ``rule_seed``, shared by all tasks). Each turn shows one door ("Door 2 of 4 is blue."); the action is a
key letter. A wrong key ends the episode with an informative error ("wrong key: the blue door opens with D"),
which is exactly the hindsight a teacher can use. Success only if every door opens.

Rewards: ``partial`` (default) = 1 / n_doors for each door as it opens, so the return is doors opened / n_doors
even for an episode the agent loop cuts short; ``binary`` = 1 only when the last door opens.
A task is its colour sequence (the task id spells it, e.g. ``red-blue-red-green``); train and validation task
sets are disjoint, fixed and deterministic given ``task_seed``. The oracle policy is the hidden rule.
"""

from __future__ import annotations

import json
import random
from typing import Optional

from verl_hindsight.environment.protocol import Environment, Observation, StepResult, register_env

COLOURS = ("red", "green", "blue", "yellow", "white", "black", "orange", "purple")
KEYS = "ABCDEFGH"


@register_env("toy")
class KeyDoorCorridor(Environment):
    instructions = (
        "You walk down a corridor of locked doors. Each door has a colour, and the key that opens it depends "
        "only on its colour. Open every door by answering with one key letter."
    )

    def __init__(self, n_doors: int = 4, n_colours: int = 6, rule_seed: int = 0, task_seed: int = 0,
                 n_train: Optional[int] = None, n_val: Optional[int] = None, reward: str = "partial",
                 interface: str = "text"):
        if not 2 <= n_colours <= len(COLOURS):
            raise ValueError(f"toy env: n_colours must be in [2, {len(COLOURS)}], got {n_colours}")
        if n_doors < 1:
            raise ValueError(f"toy env: n_doors must be >= 1, got {n_doors}")
        if interface not in ("text", "tools"):
            raise ValueError(f"toy env: interface must be 'text' or 'tools', got {interface!r}")
        self.interface = interface
        if reward not in ("partial", "binary"):
            raise ValueError(f"toy env: reward must be 'partial' or 'binary', got {reward!r}")
        total = n_colours ** n_doors
        # defaults: 128 validation and 512 training tasks, fewer when the corridor is too short to have them
        n_val = min(128, total // 5) if n_val is None else n_val
        n_train = min(512, total - n_val) if n_train is None else n_train
        if n_train + n_val > total:
            raise ValueError(f"toy env: only {n_colours ** n_doors} distinct tasks exist; asked for {n_train + n_val}")
        self.n_doors, self.reward_kind = n_doors, reward
        self.colours = COLOURS[:n_colours]
        self.keys = KEYS[:n_colours]
        perm = list(self.keys)
        random.Random(f"rule-{rule_seed}").shuffle(perm)
        self.rule = dict(zip(self.colours, perm))  # the hidden rule
        rng = random.Random(f"tasks-{task_seed}-{n_doors}-{n_colours}")
        seen: dict[tuple[str, ...], None] = {}
        while len(seen) < n_train + n_val:
            seen.setdefault(tuple(rng.choice(self.colours) for _ in range(n_doors)), None)
        ordered = ["-".join(seq) for seq in seen]
        self._splits = {"train": ordered[:n_train], "val": ordered[n_train:]}
        self._doors: list[str] = []
        self._opened = 0
        self._done = True

    def task_ids(self, split: str) -> list[str]:
        if split not in self._splits:
            raise KeyError(f"toy env: unknown split {split!r}; use 'train' or 'val'")
        return list(self._splits[split])

    def _door_text(self) -> str:
        return f"Door {self._opened + 1} of {self.n_doors} is {self._doors[self._opened]}."

    def reset(self, task_id: str) -> Observation:
        doors = task_id.split("-")
        if len(doors) != self.n_doors or any(c not in self.colours for c in doors):
            raise ValueError(f"toy env: task id {task_id!r} is not a sequence of {self.n_doors} of {self.colours}")
        self._doors, self._opened, self._done = doors, 0, False
        text = self._door_text()
        return Observation(text, {"anchor": text, "admissible_actions": list(self.keys)})

    def _door_reward(self) -> float:
        """Reward for the door just opened. Partial: 1/N per door, paid as it opens, so an episode cut short by
        the turn limit or the token budget keeps the doors it opened (the return is doors opened / N either way).
        Binary: 1 for the last door only."""
        if self.reward_kind == "binary":
            return float(self._opened == self.n_doors)
        return 1.0 / self.n_doors

    def tools(self) -> Optional[list[dict]]:
        if self.interface != "tools":
            return None
        return [{"type": "function", "function": {
            "name": "use_key", "description": "Try a key on the current door.",
            "parameters": {"type": "object", "properties": {"key": {"type": "string", "enum": list(self.keys)}},
                           "required": ["key"]}}}]

    def _key_from_tool_payload(self, payload: str) -> tuple[Optional[str], str]:
        try:
            calls = json.loads(payload)["tool_calls"]
        except (json.JSONDecodeError, KeyError, TypeError):
            return None, "malformed tool payload"
        if len(calls) != 1 or calls[0].get("name") != "use_key":
            return None, "call use_key exactly once"
        key = calls[0].get("arguments", {}).get("key")
        return (key, "") if isinstance(key, str) else (None, "use_key needs a string argument 'key'")

    def step(self, action: str) -> StepResult:
        if self._done:
            raise RuntimeError("toy env: step() after the episode ended; call reset()")
        if self.interface == "tools":
            key, problem = self._key_from_tool_payload(action)
            if key is None:
                return self.invalid_action(action, problem)
            action = key
        key = action.strip()
        if key not in self.keys:
            return self.invalid_action(action, f"unknown key {key!r}; keys are {', '.join(self.keys)}")
        colour = self._doors[self._opened]
        if key != self.rule[colour]:
            self._done = True
            error = f"wrong key: the {colour} door opens with {self.rule[colour]}"
            return StepResult(f"Key {key} does not open door {self._opened + 1}; {error}.", 0.0,
                              True, {"error": error, "success": False})
        self._opened += 1
        if self._opened == self.n_doors:
            self._done = True
            return StepResult("All doors are open.", self._door_reward(), True, {"success": True})
        text = self._door_text()
        return StepResult(text, self._door_reward(), False, {"anchor": text, "admissible_actions": list(self.keys)})

    def invalid_action(self, raw_text: str, reason: str) -> StepResult:
        # A malformed answer does not open the door; the door stays and the agent may try again.
        text = f"Invalid action: {reason}. {self._door_text()}" if not self._done else f"Invalid action: {reason}."
        return StepResult(text, 0.0, False, {"invalid_action": True, "error": reason, "anchor": self._door_text()})

    def _as_action(self, key: str) -> str:
        if self.interface == "tools":
            return json.dumps({"content": "", "tool_calls": [{"name": "use_key", "arguments": {"key": key}}]})
        return key

    def oracle_action(self) -> Optional[str]:
        return None if self._done else self._as_action(self.rule[self._doors[self._opened]])

    def random_action(self, rng: random.Random) -> str:
        return self._as_action(rng.choice(self.keys))
