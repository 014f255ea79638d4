"""Environments that fail on purpose, for the runner's fault tests (imported in env workers via env_modules).

The task id says what goes wrong and at which step: ``<mode>-<step>`` with mode one of ok, raise, hang,
malformed, crash, resetfail (fails in reset), e.g. ``hang-1`` sleeps forever on the second step.
"""

import os
import time

from verl_hindsight.environment.protocol import Environment, Observation, StepResult, register_env

MODES = ("ok", "raise", "hang", "malformed", "crash", "resetfail")


@register_env("faulty")
class FaultyEnv(Environment):
    instructions = "Answer with any letter."

    def __init__(self, steps: int = 3):
        self.steps = steps

    def task_ids(self, split):
        return [f"{mode}-{k}" for mode in MODES for k in range(2)]

    def reset(self, task_id):
        self.mode, at = task_id.split("-", 1)
        self.at, self.t = int(at), 0
        if self.mode == "resetfail":
            raise RuntimeError("reset exploded")
        return Observation(f"step 0 of {self.steps}", {"anchor": "s0"})

    def invalid_action(self, raw_text, reason):
        # malformed answers count as turns too, so a fault fires whatever the model writes
        return self.step(raw_text)

    def step(self, action):
        if self.t == self.at:
            if self.mode == "raise":
                raise RuntimeError(f"step {self.t} exploded")
            if self.mode == "hang":
                time.sleep(3600)
            if self.mode == "malformed":
                return StepResult(observation=None, reward="lots", done="maybe")  # type: ignore[arg-type]
            if self.mode == "crash":
                os._exit(3)
        self.t += 1
        done = self.t >= self.steps
        return StepResult(f"step {self.t} of {self.steps}", 1.0 if done else 0.0, done,
                          {"success": done, "anchor": f"s{self.t}"})

    def oracle_action(self):
        return "A"

    def random_action(self, rng):
        return rng.choice("AB")
