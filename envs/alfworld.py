"""``alfworld``: ALFWorld text games on the real engine (``alfworld`` 0.4.2 + TextWorld 1.7.0 PDDL backend).

Install (compiles fast-downward-textworld and jericho, needs gcc/g++/cmake; see docs/benchmarks/alfworld_webshop.md)::

    pip install alfworld==0.4.2 textworld==1.7.0

Games come from one of two places (``source`` kwarg, default ``"auto"``):

- ``"data"``: the standard ALFWorld layout downloaded by ``alfworld-download``, found at the ``data_dir`` kwarg or
  ``$ALFWORLD_DATA``: ``<root>/json_2.1.1/{train,valid_seen,valid_unseen}/<task>/<trial>/{game.tw-pddl,
  traj_data.json}`` (``<root>/{train,...}`` also accepted). Like alfworld's own loader, trials whose path contains
  ``movable`` or ``Sliced`` and games marked unsolvable are skipped.
- ``"generated"``: games built offline by :mod:`verl_hindsight.envs.alfworld_gen` from the PDDL, grammar and goal
  templates in the alfworld wheel (all six task types, deterministic in ``seed``), written once to ``cache_dir``
  (default ``~/.cache/verl-hindsight/alfworld-gen``; never the source tree). ``gen_splits`` sets games per task
  type per split (default ``{"train": 4, "valid_seen": 2, "valid_unseen": 2}``).

``"auto"`` uses the data when the layout exists at ``data_dir``/``$ALFWORLD_DATA``, the generator otherwise.

Splits and order: ``task_ids(split)`` accepts ``train``, ``valid_seen``, ``valid_unseen`` and ``val`` (an alias of
``val_split``, default ``valid_unseen``, the usual 134-game evaluation panel). Task ids are game directories relative
to the data root (``valid_unseen/<task>/<trial>``), **sorted**, so every worker and every run sees the same order.

Observations follow the SERL / verl-agent ALFWorld prompt: ``Your task is to: ...``, ``Your current observation
is: ...`` and ``Your admissible actions of the current situation are: [...]``. ``info``: ``anchor`` (the engine's
raw feedback), ``admissible_actions`` (the engine's admissible commands without ``help``), ``task_type`` (on reset
and every step, for per-type success: pick/clean/heat/cool/look/pick2), ``won``, ``success`` (at ``done``) and
``error`` for a command that has no effect (the engine answers ``Nothing happens.``). Reward: 1.0 when the game is
won, else 0. The episode also ends, unsuccessfully, after ``max_steps`` commands (default 50, SERL's horizon).

``oracle_action()`` is the next command of alfworld's hand-coded expert (``AlfredExpert(HANDCODED)``, which reads
``traj_data.json`` next to the game file); ``random_action`` picks an admissible command.
"""

from __future__ import annotations

import json
import os
import random
import re
from pathlib import Path
from typing import Any, Optional

from verl_hindsight.environment.protocol import Environment, Observation, StepResult, register_env
from verl_hindsight.envs.alfworld_gen import (
    EXPERT_SEED,
    ensure_generated,
    generated_root,
    is_generated,
    require_alfworld,
    start_game,
)

SPLITS = ("train", "valid_seen", "valid_unseen")
TASK_TYPE_SHORT = {
    "pick_and_place_simple": "pick",
    "pick_clean_then_place_in_recep": "clean",
    "pick_heat_then_place_in_recep": "heat",
    "pick_cool_then_place_in_recep": "cool",
    "look_at_obj_in_light": "look",
    "pick_two_obj_and_place": "pick2",
}
NOTHING_HAPPENS = "Nothing happens."

# Read once at import, before ``alfworld.info`` (which sets $ALFWORLD_DATA to ~/.cache/alfworld if unset).
_ENV_DATA = os.environ.get("ALFWORLD_DATA")


def find_data_root(path: Optional[str | os.PathLike]) -> Optional[Path]:
    """The directory holding train/valid_seen/valid_unseen under ``path`` (``json_2.1.1`` or ``path`` itself)."""
    if not path:
        return None
    base = Path(os.path.expandvars(os.path.expanduser(str(path))))
    for cand in (base / "json_2.1.1", base):
        if any((cand / s).is_dir() for s in SPLITS):
            return cand
    return None


def collect_games(root: Path, split: str, task_types: Optional[set[str]] = None) -> list[str]:
    """Sorted task ids (``split/<task>/<trial>``) of the playable games of ``split`` under ``root``."""
    import json

    out = []
    split_dir = root / split
    if not split_dir.is_dir():
        return out
    for traj_path in split_dir.rglob("traj_data.json"):
        game_dir = traj_path.parent
        rel = game_dir.relative_to(root).as_posix()
        if "movable" in rel or "Sliced" in rel:
            continue
        game_file = game_dir / "game.tw-pddl"
        if not game_file.exists():
            continue
        if task_types is not None:
            if json.loads(traj_path.read_text()).get("task_type") not in task_types:
                continue
        out.append(rel)
    return sorted(out)


def split_task(feedback: str) -> tuple[str, str]:
    """Intro feedback -> (task, observation without the banner and the task line)."""
    text = feedback.replace("-= Welcome to TextWorld, ALFRED! =-", "").strip()
    m = re.search(r"Your task is to:\s*(.*)", text)
    if not m:
        return "", text
    return m.group(1).strip(), text[:m.start()].strip()


@register_env("alfworld")
class ALFWorldEnv(Environment):
    instructions = (
        "You are an expert agent operating in the ALFRED embodied household environment (ALFWorld). Complete the "
        "task by choosing, at every turn, one of the admissible actions, written exactly as listed."
    )

    def __init__(self, source: str = "auto", data_dir: Optional[str] = None, cache_dir: Optional[str] = None,
                 seed: int = 0, gen_splits: Optional[dict[str, int]] = None, val_split: str = "valid_unseen",
                 task_types: Optional[list[str]] = None, max_steps: int = 50, show_actions: bool = True):
        if source not in ("auto", "data", "generated"):
            raise ValueError(f"alfworld env: source must be 'auto', 'data' or 'generated', got {source!r}")
        if val_split not in SPLITS:
            raise ValueError(f"alfworld env: val_split must be one of {SPLITS}, got {val_split!r}")
        require_alfworld()
        self.val_split, self.max_steps, self.show_actions = val_split, int(max_steps), show_actions
        self.task_types = set(task_types) if task_types else None
        if self.task_types and not self.task_types <= set(TASK_TYPE_SHORT):
            raise ValueError(f"alfworld env: unknown task types {sorted(self.task_types - set(TASK_TYPE_SHORT))}")
        data_root = find_data_root(data_dir or _ENV_DATA) if source != "generated" else None
        if source == "data" and data_root is None:
            raise FileNotFoundError(
                f"alfworld env: no ALFWorld data layout (json_2.1.1/{{train,valid_seen,valid_unseen}}) at "
                f"{data_dir or _ENV_DATA or '$ALFWORLD_DATA (unset)'}; run `alfworld-download` or use source='generated'")
        if data_root is not None:
            self.root, self.source = data_root, "data"
        else:
            self.root, self.source = generated_root(cache_dir, seed, gen_splits), "generated"
            if not is_generated(self.root):
                kwargs = {k: v for k, v in (("source", source), ("cache_dir", cache_dir), ("seed", seed),
                                            ("gen_splits", gen_splits)) if v not in (None, 0, "auto")}
                raise FileNotFoundError(
                    f"alfworld env: no generated games at {self.root} (generating takes minutes, more than an env "
                    f"worker may take to start): run `verl-hindsight prepare-data alfworld OUT_DIR"
                    f"{' --env-kwargs ' + repr(json.dumps(kwargs)) if kwargs else ''}` once first")
        self._ids: dict[str, list[str]] = {}
        self._env = None
        self._done = True

    @classmethod
    def prepare(cls, progress: bool = False, source: str = "auto", data_dir: Optional[str] = None,
                cache_dir: Optional[str] = None, seed: int = 0, gen_splits: Optional[dict[str, int]] = None,
                **_: Any) -> None:
        """Generate the offline games (once, into the cache) unless the run will read an ALFWorld data folder."""
        if source == "data" or (source == "auto" and find_data_root(data_dir or _ENV_DATA) is not None):
            return
        require_alfworld()
        ensure_generated(cache_dir, seed, gen_splits, progress=progress)

    # ------------------------------------------------------------------ tasks
    def task_ids(self, split: str) -> list[str]:
        split = self.val_split if split == "val" else split
        if split not in SPLITS:
            raise KeyError(f"alfworld env: unknown split {split!r}; use 'train', 'val', 'valid_seen' or 'valid_unseen'")
        if split not in self._ids:
            self._ids[split] = collect_games(self.root, split, self.task_types)
        return list(self._ids[split])

    def _game_dir(self, task_id: str) -> Path:
        path = (self.root / task_id).resolve()
        if self.root.resolve() not in path.parents or not (path / "game.tw-pddl").exists():
            raise KeyError(f"alfworld env: unknown task id {task_id!r} under {self.root}")
        return path

    # ------------------------------------------------------------------ episode
    def reset(self, task_id: str) -> Observation:
        import json

        game_dir = self._game_dir(task_id)
        self.close()
        traj = json.loads((game_dir / "traj_data.json").read_text())
        self.task_type = traj.get("task_type", "")
        # alfworld's expert breaks loops with the global random module: seed it like the generator's verification
        # run (alfworld_gen.play_expert), so the oracle replays exactly the verified plan
        random.seed(EXPERT_SEED)
        self._env = start_game(str(game_dir / "game.tw-pddl"))
        self._state = self._env.reset()
        self.task, obs = split_task(self._state["feedback"])
        self._steps, self._done, self._won = 0, False, False
        text = self._render(obs)
        info = self._info(obs)
        info["task"] = self.task
        return Observation(text, info)

    def _admissible(self) -> list[str]:
        return [c for c in self._state["admissible_commands"] if c != "help"]

    def _render(self, obs: str) -> str:
        parts = [f"Your task is to: {self.task}", f"Your current observation is: {obs}"]
        if self.show_actions and not self._done:
            acts = ", ".join(f"'{a}'" for a in self._admissible())
            parts.append(f"Your admissible actions of the current situation are: [{acts}].")
        return "\n".join(parts)

    def _info(self, obs: str) -> dict[str, Any]:
        return {"anchor": obs, "admissible_actions": self._admissible(), "task_type": self.task_type,
                "task_type_short": TASK_TYPE_SHORT.get(self.task_type, self.task_type), "won": self._won}

    def step(self, action: str) -> StepResult:
        if self._done or self._env is None:
            raise RuntimeError("alfworld env: step() after the episode ended; call reset()")
        command = " ".join(action.strip().strip(".").split()).lower()
        admissible = self._admissible()
        self._state, _score, done = self._env.step(command)
        self._steps += 1
        obs = self._state["feedback"].strip()
        self._won = bool(self._state.get("won"))
        info = {}
        if obs == NOTHING_HAPPENS or command not in admissible:
            info["error"] = (f"'{command}' had no effect: it is not one of the admissible actions"
                             if command not in admissible else f"'{command}' had no effect")
        if self._won or done:
            self._done = True
        elif self._steps >= self.max_steps:
            self._done = True
            info["error"] = f"step limit of {self.max_steps} reached"
        info = {**self._info(obs), **info}
        if self._done:
            info.update(success=self._won, won=self._won)
        return StepResult(self._render(obs), 1.0 if self._won else 0.0, self._done, info)

    def invalid_action(self, raw_text: str, reason: str) -> StepResult:
        if self._done or self._env is None:
            return super().invalid_action(raw_text, reason)
        obs = f"Invalid action ({reason}). Choose exactly one of the admissible actions."
        info = {**self._info(obs), "invalid_action": True, "error": reason}
        return StepResult(self._render(obs), 0.0, False, info)

    # ------------------------------------------------------------------ policies
    def oracle_action(self) -> Optional[str]:
        if self._done or self._env is None:
            return None
        plan = self._state.get("extra.expert_plan") or []
        return plan[0] if plan else None

    def random_action(self, rng: random.Random) -> str:
        return rng.choice(self._admissible())

    def close(self) -> None:
        if self._env is not None:
            try:
                self._env.close()
            finally:
                self._env = None
