"""Offline generator of playable ALFWorld games (``game.tw-pddl`` + ``traj_data.json``) for the real engine.

ALFWorld's games are normally downloaded from GitHub releases (``alfworld-download``) and ``alfworld-generate``
needs AI2-THOR. This module builds games from what the ``alfworld`` wheel ships: the PDDL domain
(``alfred.pddl``), the text grammar (``alfred.twl2``) and the goal templates (``alfworld.gen.goal_library``),
plus a small hand-written scene: receptacles at locations, objects in receptacles, the object properties
(pickupable / cleanable / heatable / coolable / toggleable from ``alfworld.gen.constants.VAL_ACTION_OBJECTS``) and
``canContain`` facts (``VAL_RECEPTACLE_OBJECTS``). Object and receptacle ids use ALFRED's mangled form
(``Apple_bar__minus_01_dot_75_bar_...``; sinks are ``Sink_bar_..._bar_SinkBasin``) so that alfworld's demangler and
hand-coded expert work unchanged.

All six ALFWorld task types are generated: pick_and_place_simple, pick_clean_then_place_in_recep,
pick_heat_then_place_in_recep, pick_cool_then_place_in_recep, look_at_obj_in_light, pick_two_obj_and_place.

Determinism: game ``i`` of a split depends only on ``(seed, split, i)`` (string-seeded :class:`random.Random`),
so the same arguments always give byte-identical files. With ``verify=True`` (default) each game is played once
by alfworld's hand-coded expert on the real TextWorld engine; a scene the expert does not win within
``max_expert_steps`` is re-drawn (the next attempt number), so every written game is known to be solvable.

Layout written (the standard ALFWorld layout, so :mod:`verl_hindsight.envs.alfworld` reads both the same way)::

    OUT/<split>/<task_type>-<obj>-<recep>-gen<seed>_<i>/trial_gen_<seed>_<i>/{game.tw-pddl,traj_data.json}

    python -m verl_hindsight.envs.alfworld_gen OUT --per-type 2 --splits train:4,valid_seen:2 --seed 0
"""

from __future__ import annotations

import argparse
import json
import os
import random
from pathlib import Path
from typing import Callable, Optional

TASK_TYPES = (
    "pick_and_place_simple",
    "pick_clean_then_place_in_recep",
    "pick_heat_then_place_in_recep",
    "pick_cool_then_place_in_recep",
    "look_at_obj_in_light",
    "pick_two_obj_and_place",
)

# scenes: receptacle classes that may appear (with max instance counts) and the objects that may be sampled
KITCHEN_RECEPS = {"CounterTop": 2, "Cabinet": 3, "Drawer": 2, "DiningTable": 1, "Fridge": 1, "Microwave": 1,
                  "SinkBasin": 1, "GarbageCan": 1, "Shelf": 1, "StoveBurner": 1, "CoffeeMachine": 1}
ROOM_RECEPS = {"SideTable": 2, "Desk": 1, "Dresser": 1, "Drawer": 2, "Shelf": 2, "Bed": 1, "Sofa": 1,
               "ArmChair": 1, "GarbageCan": 1, "Safe": 1, "Cabinet": 1}
KITCHEN_OBJECTS = ["Apple", "Bowl", "Bread", "ButterKnife", "Cup", "DishSponge", "Egg", "Fork", "Kettle", "Knife",
                   "Ladle", "Lettuce", "Mug", "Pan", "PepperShaker", "Plate", "Pot", "Potato", "SaltShaker",
                   "SoapBottle", "Spatula", "Spoon", "Tomato", "WineBottle"]
ROOM_OBJECTS = ["AlarmClock", "Book", "CD", "CellPhone", "CreditCard", "KeyChain", "Pen", "Pencil",
                "RemoteControl", "Statue", "Vase", "Watch", "Box", "Newspaper"]
OPENABLE = {"Fridge", "Cabinet", "Microwave", "Drawer", "Safe"}

# alfworld's expert breaks loops with the global random module; the generator's verification run and the
# environment both seed it with this value, so the oracle replays exactly the verified plan
EXPERT_SEED = 0


def require_alfworld():
    try:
        import alfworld  # noqa: F401
        import textworld  # noqa: F401
    except ImportError as exc:
        raise ImportError("the alfworld environment needs `pip install alfworld==0.4.2 textworld==1.7.0` "
                          "(compiles fast-downward-textworld and jericho; needs gcc/g++/cmake)") from exc


def start_game(game_file: str):
    """The real engine on one game, with alfworld's wrappers: demangled names, gamefile, hand-coded expert plan."""
    require_alfworld()
    import textworld
    from alfworld.agents.environment.alfred_tw_env import (AlfredDemangler, AlfredExpert, AlfredExpertType,
                                                           AlfredInfos)

    infos = textworld.EnvInfos(won=True, admissible_commands=True, extras=["gamefile", "expert_plan"])
    return textworld.start(game_file, request_infos=infos,
                           wrappers=[AlfredDemangler(shuffle=False), AlfredInfos,
                                     AlfredExpert(expert_type=AlfredExpertType.HANDCODED)])



def _mangle_coord(v: float) -> str:
    sign = "_plus_" if v >= 0 else "_minus_"
    return f"{sign}{abs(v):05.2f}".replace(".", "_dot_")


def mangled_id(cls: str, rng: random.Random, suffix: str = "") -> str:
    """An ALFRED-style id: ``Apple|-01.75|+00.88|-00.50`` mangled to ``Apple_bar__minus_01_dot_75_bar_...``."""
    coords = [round(rng.uniform(-4, 4), 2), round(rng.uniform(0, 2), 2), round(rng.uniform(-4, 4), 2)]
    out = cls + "".join("_bar_" + _mangle_coord(c) for c in coords)
    return out + (f"_bar_{suffix}" if suffix else "")


def _constants():
    import alfworld.gen.constants as c

    return c.VAL_ACTION_OBJECTS, c.VAL_RECEPTACLE_OBJECTS


def sample_task(task_type: str, rng: random.Random) -> dict:
    """Choose the scene and the task parameters (no files)."""
    actions, contain = _constants()
    look = task_type == "look_at_obj_in_light"
    recep_pool = ROOM_RECEPS if look else KITCHEN_RECEPS
    obj_pool = ROOM_OBJECTS if look else KITCHEN_OBJECTS
    required = {"pick_clean_then_place_in_recep": ("SinkBasin", "Cleanable"),
                "pick_heat_then_place_in_recep": ("Microwave", "Heatable"),
                "pick_cool_then_place_in_recep": ("Fridge", "Coolable")}.get(task_type)
    # target object and receptacle
    for _ in range(1000):
        obj = rng.choice(obj_pool)
        if required and obj not in actions[required[1]]:
            continue
        if look:
            recep = ""
            break
        receps = [r for r in recep_pool if obj in contain.get(r, ()) and r not in ("SinkBasin", "Microwave", "Fridge",
                                                                                  "GarbageCan")]
        if len(receps) < 1:
            continue
        recep = rng.choice(sorted(receps))
        # the object must start somewhere else than the target class
        if any(obj in contain.get(r, ()) for r in recep_pool if r != recep):
            break
    else:  # pragma: no cover - the pools above always allow a choice
        raise RuntimeError(f"cannot sample a {task_type} task")
    # receptacles in the scene
    classes = {recep} if recep else set()
    if required:
        classes.add(required[0])
    if look:
        classes.add(rng.choice(["SideTable", "Desk", "Dresser"]))  # where the lamp stands
    n_classes = rng.randint(5, 7)
    others = [r for r in sorted(recep_pool) if r not in classes]
    rng.shuffle(others)
    for r in others:
        if len(classes) >= n_classes:
            break
        classes.add(r)
    homes = [r for r in sorted(classes) if obj in contain.get(r, ()) and r != recep]
    if not homes:
        extra = sorted(r for r in recep_pool if obj in contain.get(r, ()) and r != recep and r not in classes)
        classes.add(rng.choice(extra))
    receptacles = []
    for cls in sorted(classes):
        for _ in range(rng.randint(1, recep_pool[cls])):
            receptacles.append(cls)
    return {"task_type": task_type, "obj": obj, "recep": recep, "toggle": "DeskLamp" if look else "",
            "receptacles": receptacles, "obj_pool": obj_pool}


def build_problem(task: dict, rng: random.Random) -> tuple[str, dict]:
    """PDDL problem text (with the goal from alfworld's goal library) and traj_data for ``task``."""
    import alfworld.gen.goal_library as glib

    actions, contain = _constants()
    task_type, obj, recep, toggle = task["task_type"], task["obj"], task["recep"], task["toggle"]
    objects: dict[str, str] = {}   # id -> type name
    receps: dict[str, str] = {}
    locs: dict[str, str] = {}      # recep id -> location
    for k, cls in enumerate(task["receptacles"]):
        rid = mangled_id("Sink", rng, "SinkBasin") if cls == "SinkBasin" else mangled_id(cls, rng)
        receps[rid] = cls
        locs[rid] = f"loc_bar_{k + 1}_bar_{rng.randint(0, 9)}_bar_{rng.choice([0, 1, 2, 3])}_bar_{rng.choice([30, 45, 60])}"
    start_loc = "loc_bar_0_bar_0_bar_0_bar_0"
    placement: dict[str, str] = {}  # object id -> recep id

    def place(cls: str, avoid: str = "") -> None:
        options = [r for r, rc in receps.items() if cls in contain.get(rc, ()) and rc != avoid]
        if cls == "DeskLamp":
            options = [r for r, rc in receps.items() if rc in ("SideTable", "Desk", "Dresser")]
        oid = mangled_id(cls, rng)
        objects[oid] = cls
        placement[oid] = rng.choice(sorted(options))

    for _ in range(2 if task_type == "pick_two_obj_and_place" else 1):
        place(obj, avoid=recep)
    if toggle:
        place(toggle)
    distractors = [o for o in task["obj_pool"] if o != obj and any(o in contain.get(rc, ()) for rc in receps.values())]
    for cls in rng.sample(sorted(distractors), min(len(distractors), rng.randint(3, 6))):
        place(cls)

    otypes = sorted(set(objects.values()) | {obj})
    rtypes = sorted(set(receps.values()))
    lines = ["(define (problem plan_generated)", "(:domain alfred)", "(:objects", "agent1 - agent"]
    lines += [f"{t}Type - otype" for t in otypes]
    lines += [f"{t}Type - rtype" for t in rtypes]
    lines += [f"{oid} - object" for oid in sorted(objects)]
    lines += [f"{rid} - receptacle" for rid in sorted(receps)]
    lines += [f"{loc} - location" for loc in sorted(set(locs.values()) | {start_loc})]
    lines += [")", "(:init", f"(atLocation agent1 {start_loc})"]
    for rid in sorted(receps):
        cls = receps[rid]
        lines += [f"(receptacleType {rid} {cls}Type)", f"(receptacleAtLocation {rid} {locs[rid]})"]
        if cls in OPENABLE:
            lines.append(f"(openable {rid})")
    for rt in rtypes:
        for ot in otypes:
            if ot in contain.get(rt, ()):
                lines.append(f"(canContain {rt}Type {ot}Type)")
    for oid in sorted(objects):
        cls = objects[oid]
        lines += [f"(objectType {oid} {cls}Type)", f"(inReceptacle {oid} {placement[oid]})",
                  f"(objectAtLocation {oid} {locs[placement[oid]]})"]
        if cls in actions["Toggleable"]:
            lines.append(f"(toggleable {oid})")
        else:
            lines.append(f"(pickupable {oid})")
        for prop, pred in (("Cleanable", "cleanable"), ("Heatable", "heatable"), ("Coolable", "coolable"),
                           ("Sliceable", "sliceable")):
            if cls in actions[prop]:
                lines.append(f"({pred} {oid})")
    lines.append(")")
    goal = glib.gdict[task_type]["pddl"].format(obj=obj, recep=recep, toggle=toggle).replace("#", "-")
    problem = "\n".join(lines) + "\n" + goal
    traj = {"task_type": task_type, "task_id": "", "scene": {"generated": True},
            "pddl_params": {"object_sliced": False, "object_target": obj, "parent_target": recep,
                            "toggle_target": toggle, "mrecep_target": ""}}
    return problem, traj


def task_description(traj: dict, rng: random.Random) -> str:
    """alfworld's templated goal text (``get_templated_task_desc``) with a seeded template choice."""
    import alfworld.gen.goal_library as glib

    p = traj["pddl_params"]
    template = rng.choice(glib.gdict[traj["task_type"]]["templates"])
    return template.format(obj=p["object_target"].lower(), recep=p["parent_target"].lower(),
                           toggle=p["toggle_target"].lower(), mrecep=p["mrecep_target"].lower())


def write_game(game_dir: Path, task: dict, rng: random.Random) -> Path:
    from alfworld.info import ALFRED_PDDL_PATH, ALFRED_TWL2_PATH

    problem, traj = build_problem(task, rng)
    desc = task_description(traj, rng)
    grammar = Path(ALFRED_TWL2_PATH).read_text().replace("UNKNOWN GOAL", desc)
    game_dir.mkdir(parents=True, exist_ok=True)
    traj["task_id"] = game_dir.parent.name
    traj["turk_annotations"] = {"anns": [{"task_desc": desc}]}
    game = {"pddl_domain": Path(ALFRED_PDDL_PATH).read_text(), "grammar": grammar, "pddl_problem": problem,
            "solvable": True}
    path = game_dir / "game.tw-pddl"
    path.write_text(json.dumps(game, sort_keys=True))
    (game_dir / "traj_data.json").write_text(json.dumps(traj, sort_keys=True, indent=1))
    return path


def play_expert(game_file: str | Path, max_steps: int = 60) -> tuple[bool, list[str]]:
    """Play ``game_file`` with alfworld's hand-coded expert on the real engine: (won, commands)."""

    random.seed(EXPERT_SEED)  # the expert breaks loops with random.choice; the env seeds the same way
    env = start_game(str(game_file))
    try:
        state = env.reset()
        commands: list[str] = []
        for _ in range(max_steps):
            plan = state["extra.expert_plan"]
            if not plan:
                return False, commands
            commands.append(plan[0])
            state, _, done = env.step(plan[0])
            if done:
                return bool(state["won"]), commands
        return False, commands
    finally:
        env.close()


def generate_split(out_dir: str | Path, split: str, per_type: int, seed: int = 0,
                   task_types: tuple[str, ...] = TASK_TYPES, verify: bool = True,
                   max_expert_steps: int = 40, max_attempts: int = 20,
                   on_game: Optional[Callable[[], object]] = None) -> list[Path]:
    """Write ``per_type`` games of every task type into ``out_dir/split``; returns the game files (sorted).
    ``on_game`` is called after each game is written (and verified)."""
    out = Path(out_dir) / split
    files = []
    for task_type in task_types:
        for i in range(per_type):
            for attempt in range(max_attempts):
                rng = random.Random(f"alfworld-gen|{seed}|{split}|{task_type}|{i}|{attempt}")
                task = sample_task(task_type, rng)
                name = f"{task_type}-{task['obj']}-{task['recep'] or task['toggle']}-gen{seed}_{i}"
                game_dir = out / name / f"trial_gen_{seed}_{i}"
                marker = game_dir / ".verified"
                if marker.exists() and (game_dir / "game.tw-pddl").exists():
                    files.append(game_dir / "game.tw-pddl")
                    break
                path = write_game(game_dir, task, rng)
                if not verify:
                    files.append(path)
                    break
                won, commands = play_expert(path, max_expert_steps)
                if won:
                    marker.write_text(json.dumps({"expert_steps": len(commands)}))
                    files.append(path)
                    break
                # not solvable by the expert within the budget: remove and draw another scene
                for f in game_dir.iterdir():
                    f.unlink()
                game_dir.rmdir()
                game_dir.parent.rmdir()
            else:
                raise RuntimeError(f"alfworld_gen: no expert-solvable {task_type} scene in {max_attempts} attempts")
            if on_game is not None:
                on_game()
    return sorted(files)


DEFAULT_SPLITS = {"train": 4, "valid_seen": 2, "valid_unseen": 2}


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "verl-hindsight" / "alfworld-gen"


def generated_root(cache_dir: Optional[str | Path] = None, seed: int = 0,
                   splits: Optional[dict[str, int]] = None) -> Path:
    """Where :func:`ensure_generated` writes the games of ``(seed, splits)``: ``cache_dir/seed<seed>-<spec>``."""
    splits = dict(DEFAULT_SPLITS if splits is None else splits)
    spec = "-".join(f"{k}{v}" for k, v in sorted(splits.items()))
    return Path(cache_dir or default_cache_dir()) / f"seed{seed}-{spec}"


def is_generated(root: Path) -> bool:
    return (root / ".complete").exists()


def ensure_generated(cache_dir: Optional[str | Path] = None, seed: int = 0,
                     splits: Optional[dict[str, int]] = None, verify: bool = True, progress: bool = False) -> Path:
    """Generate (once) the games for every split into :func:`generated_root`; returns that root. Minutes on a small
    machine (each game is verified by playing TextWorld's expert), hence ``progress``: a bar over the games."""
    splits = dict(DEFAULT_SPLITS if splits is None else splits)
    root = generated_root(cache_dir, seed, splits)
    if is_generated(root):
        return root
    root.mkdir(parents=True, exist_ok=True)
    from filelock import FileLock  # a verl dependency; several processes may start at once

    with FileLock(str(root) + ".lock"):
        if not is_generated(root):
            bar = None
            if progress:
                from tqdm import tqdm

                bar = tqdm(total=sum(splits.values()) * len(TASK_TYPES), unit="game",
                           desc=f"generating ALFWorld games into {root}")
            try:
                for split, per_type in sorted(splits.items()):
                    generate_split(root, split, per_type, seed, verify=verify,
                                   on_game=bar.update if bar is not None else None)
            finally:
                if bar is not None:
                    bar.close()
            (root / ".complete").write_text("ok\n")
    return root


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", nargs="?", default=None, help="output root (default: the cache dir)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--splits", default="train:4,valid_seen:2,valid_unseen:2",
                        help="split:games_per_task_type,...")
    parser.add_argument("--no-verify", action="store_true")
    args = parser.parse_args(argv)
    splits = {s.split(":")[0]: int(s.split(":")[1]) for s in args.splits.split(",") if s}
    root = ensure_generated(args.out, args.seed, splits, verify=not args.no_verify, progress=True)
    n = sum(1 for _ in root.glob("*/*/*/game.tw-pddl"))
    print(f"{root}: {n} games")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
