"""``bfcl``: BFCL v3 multi-turn (Berkeley Function-Calling Leaderboard) on the package's own data, backends and checker.

Install (pinned; see docs/benchmarks/bfcl_tau.md): ``pip install --no-deps -r requirements/bfcl-nodeps.txt``
(``bfcl-eval==2026.3.23`` + ``mpmath``). A full ``pip install bfcl-eval`` pulls CUDA torch and more and pins
numpy 1.26; the multi-turn backends and checker need only the standard library and mpmath.

Env kwargs: ``category`` in ``base`` (default), ``miss_func``, ``miss_param``, ``long_context``;
``max_steps_per_turn`` (default: BFCL's ``MAXIMUM_STEP_LIMIT`` = 20; more tool-call steps in one user turn is
BFCL's "force quit" and the episode fails).

Tasks and splits: the 200 ids ``multi_turn_<category>_<i>`` of the category, sorted by ``i``. ``val`` = ``i % 5 == 0``
(40 tasks), ``train`` = the other 160, ``all`` (alias ``test``) = all 200 in order (the benchmark as reported).
The rule is the same for every category, and ``multi_turn_<c>_<i>`` is derived from the same scenario for every
``c``, so no validation scenario appears in training in any category.

Episode: the task's ``question`` is a list of user turns. The first observation is user turn 0. The agent answers
with Hermes tool calls (payload ``{"content", "tool_calls": [{"name", "arguments"}]}``); every call is validated
(name in the task's *currently declared* functions, arguments JSON literals within bounds, argument names bound
to the method's signature) and executed by direct method dispatch on this episode's own backend instances
(never ``eval``); the observation lists each call's result, and ``info["error"]`` the execution errors. A message
without tool calls ends the current user turn; the next observation is the next user turn. In ``miss_func`` a
held-out function is revealed at the turn the benchmark says (``missed_function``): that turn's observation is
BFCL's own "I have updated some more functions you can choose from. What about now?" followed by the new
functions' schemas as JSON, since ``tools()`` is fixed per episode (it returns the functions declared at the start).

Reward: at the end of the last user turn, BFCL's ``multi_turn_checker`` verdict (1.0 / 0.0) on the decoded calls
per turn (each a call string re-rendered from the validated literals, see :func:`call_parser.render_call`);
``info["checker"]`` holds the checker's ``error_type`` and ``error_message`` and ``info["success"]`` the verdict.
The checker keeps its instances in module globals keyed by model name and test id: every episode uses a fresh
unique model name and deletes those globals afterwards.

Oracle: the ground truth (``possible_answer``) of the current turn, parsed with the strict AST parser
(:mod:`call_parser`) and written as Hermes calls with keyword arguments, then a plain message ending the turn.
"""

from __future__ import annotations

import copy
import importlib
import inspect
import json
import uuid
from functools import lru_cache
from importlib import resources
from typing import Any, Optional

from verl_hindsight.environment.protocol import Environment, Observation, StepResult, register_env
from verl_hindsight.envs.call_parser import (
    CallParseError,
    ParsedCall,
    parse_python_calls,
    render_call,
    validate_arguments,
)

CATEGORIES = ("base", "miss_func", "miss_param", "long_context")
BFCL_PIN = "bfcl-eval==2026.3.23"
ADDITIONAL_FUNCTION_PROMPT = "I have updated some more functions you can choose from. What about now?"
DEFAULT_MAX_STEPS = 20
END_TURN_TEXT = "Done."


def _require_bfcl():
    try:
        import bfcl_eval  # noqa: F401
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise ImportError(
            f"the bfcl environment needs {BFCL_PIN} installed without its dependencies: "
            "pip install --no-deps -r requirements/bfcl-nodeps.txt") from exc


def _bfcl_modules():
    _require_bfcl()
    from bfcl_eval.eval_checker.multi_turn_eval import multi_turn_utils
    from bfcl_eval.eval_checker.multi_turn_eval.multi_turn_checker import multi_turn_checker

    return multi_turn_utils, multi_turn_checker


@lru_cache(maxsize=None)
def _func_doc_files() -> dict[str, str]:
    _require_bfcl()
    try:  # bfcl-eval <= 2025.8.6
        from bfcl_eval.constants.category_mapping import MULTI_TURN_FUNC_DOC_FILE_MAPPING
    except ImportError:  # later versions (v4 data) moved it
        from bfcl_eval.constants.executable_backend_config import MULTI_TURN_FUNC_DOC_FILE_MAPPING
    return dict(MULTI_TURN_FUNC_DOC_FILE_MAPPING)


def _data_dir():
    # Not bfcl_eval.constants.eval_config: importing it creates result/ and score/ folders in site-packages.
    _require_bfcl()
    return resources.files("bfcl_eval").joinpath("data")


def _read_jsonl(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _category_file(folder, category: str):
    for prefix in ("BFCL_v3", "BFCL_v4"):
        path = folder.joinpath(f"{prefix}_multi_turn_{category}.json")
        if path.is_file():
            return path
    raise FileNotFoundError(f"bfcl: no BFCL_v3/v4 multi_turn_{category}.json under {folder}")


@lru_cache(maxsize=None)
def load_category(category: str) -> tuple[dict[str, dict], dict[str, list[list[str]]]]:
    """(entries by id, ground truth by id) of one category, straight from the package's data files."""
    if category not in CATEGORIES:
        raise ValueError(f"bfcl: category must be one of {CATEGORIES}, got {category!r}")
    data = _data_dir()
    entries = {e["id"]: e for e in _read_jsonl(_category_file(data, category))}
    answers = {a["id"]: a["ground_truth"] for a in _read_jsonl(_category_file(data.joinpath("possible_answer"),
                                                                              category))}
    missing = set(entries) - set(answers)
    if missing:
        raise ValueError(f"bfcl: {len(missing)} {category} tasks have no ground truth, e.g. {sorted(missing)[:3]}")
    return entries, answers


@lru_cache(maxsize=None)
def _func_docs(class_name: str) -> tuple[dict, ...]:
    path = _data_dir().joinpath("multi_turn_func_doc", _func_doc_files()[class_name])
    return tuple(_read_jsonl(path))


def _task_index(task_id: str) -> int:
    return int(task_id.rsplit("_", 1)[1])


def split_ids(category: str, split: str) -> list[str]:
    entries, _ = load_category(category)
    ids = sorted(entries, key=_task_index)
    if split in ("all", "test"):
        return ids
    if split == "val":
        return [i for i in ids if _task_index(i) % 5 == 0]
    if split == "train":
        return [i for i in ids if _task_index(i) % 5 != 0]
    raise KeyError(f"bfcl: unknown split {split!r}; use 'train', 'val' or 'all'")


_TYPE_MAP = {
    "integer": "integer", "number": "number", "float": "number", "string": "string", "boolean": "boolean",
    "bool": "boolean", "array": "array", "list": "array", "dict": "object", "object": "object", "tuple": "array",
    "any": "string",
}


def _to_json_schema(node: Any) -> Any:
    """BFCL's function-doc types ("dict", "float", "tuple", "any") as JSON-schema types, recursively."""
    if isinstance(node, dict):
        out = {}
        for key, value in node.items():
            if key == "type" and isinstance(value, str):
                out[key] = _TYPE_MAP.get(value, value)
            elif key == "properties" and isinstance(value, dict):
                out[key] = {name: _to_json_schema(prop) for name, prop in value.items()}
            else:
                out[key] = _to_json_schema(value)
        return out
    if isinstance(node, list):
        return [_to_json_schema(v) for v in node]
    return node


def openai_schema(doc: dict) -> dict:
    """One BFCL function doc as an OpenAI function schema (the ``response`` description is dropped)."""
    return {"type": "function", "function": {
        "name": doc["name"], "description": doc.get("description", ""),
        "parameters": _to_json_schema(doc.get("parameters", {"type": "dict", "properties": {}}))}}


def _format_result(result: Any) -> str:
    # the same rendering as bfcl_eval's execute_multi_turn_func_call, so the model sees what the benchmark shows
    if isinstance(result, str):
        return result
    if isinstance(result, dict):
        try:
            return json.dumps(result)
        except (TypeError, ValueError):
            return str(result)
    return str(result)


@register_env("bfcl")
class BFCLMultiTurn(Environment):
    instructions = (
        "You are an assistant with access to functions (tools). Complete each user request by calling the "
        "functions; the results come back as tool messages. Use only the functions you have been given, with "
        "literal arguments. When the current request is done, or cannot be done because a function or a needed "
        "parameter is missing, answer with a plain message without tool calls; the user will then send the next "
        "request. A user message may announce new functions; you can call them from then on."
    )

    def __init__(self, category: str = "base", max_steps_per_turn: int = DEFAULT_MAX_STEPS):
        if category not in CATEGORIES:
            raise ValueError(f"bfcl: category must be one of {CATEGORIES}, got {category!r}")
        self.category = category
        self.max_steps_per_turn = int(max_steps_per_turn)
        self._entries, self._answers = load_category(category)
        self._done = True
        self._entry: Optional[dict] = None

    # ----------------------------------------------------------------- tasks
    def task_ids(self, split: str) -> list[str]:
        return split_ids(self.category, split)

    # --------------------------------------------------------------- episode
    def reset(self, task_id: str) -> Observation:
        if task_id not in self._entries:
            raise KeyError(f"bfcl: unknown {self.category} task id {task_id!r}")
        entry = self._entries[task_id]
        self._entry = entry
        self._gt: list[list[str]] = self._answers[task_id]
        self._turns: list[list[dict]] = entry["question"]
        if len(self._gt) != len(self._turns):
            raise ValueError(f"bfcl: {task_id} has {len(self._turns)} turns but {len(self._gt)} ground-truth turns")
        self._long_context = "long_context" in task_id or "composite" in task_id
        utils, _ = _bfcl_modules()
        self._instances: dict[str, Any] = {}
        self._owner: dict[str, str] = {}  # public method name -> class name (later classes win, as in bfcl_eval)
        for class_name in entry["involved_classes"]:
            module = importlib.import_module(utils.CLASS_FILE_PATH_MAPPING[class_name])
            instance = getattr(module, class_name)()
            if class_name not in utils.STATELESS_CLASSES:
                instance._load_scenario(copy.deepcopy(entry["initial_config"].get(class_name, {})),
                                        long_context=self._long_context)
            self._instances[class_name] = instance
            for name, _ in inspect.getmembers(instance, predicate=inspect.ismethod):
                if not name.startswith("_"):
                    self._owner[name] = class_name
        excluded = set(entry.get("excluded_function", []))  # v4 data only
        docs = [d for c in entry["involved_classes"] for d in _func_docs(c) if d["name"] not in excluded]
        held = {str(t): list(names) for t, names in (entry.get("missed_function") or {}).items()}
        held_names = {n for names in held.values() for n in names}
        self._held_docs = {t: [d for d in docs if d["name"] in names] for t, names in held.items()}
        self._docs = [d for d in docs if d["name"] not in held_names]
        self._all_names = {d["name"] for d in docs if d["name"] in self._owner}
        self._available = {d["name"] for d in self._docs if d["name"] in self._owner}
        self._tools = [openai_schema(d) for d in self._docs]
        self._decoded: list[list[list[str]]] = [[] for _ in self._turns]
        self._turn = 0
        self._steps_in_turn = 0
        self._oracle_sent_turn = -1
        self._done = False
        text = self._turn_text(0)
        return Observation(text, {"anchor": text, "turn": 0, "num_turns": len(self._turns)})

    def tools(self) -> Optional[list[dict]]:
        # [] before reset: a tool-calling env whose tools depend on the task (data preparation can tell it apart
        # from a text env, whose tools() is None)
        return [] if self._entry is None else [dict(t) for t in self._tools]

    def _turn_text(self, turn: int) -> str:
        messages = self._turns[turn]
        if str(turn) in self._held_docs:
            revealed = self._held_docs[str(turn)]
            self._available |= {d["name"] for d in revealed if d["name"] in self._owner}
            schemas = json.dumps([openai_schema(d) for d in revealed])
            head = "\n".join(m["content"] for m in messages) if messages else ADDITIONAL_FUNCTION_PROMPT
            return f"{head}\nNew functions: {schemas}"
        return "\n".join(m["content"] for m in messages)

    def _bind(self, call: ParsedCall) -> ParsedCall:
        """Keyword form of a call, checked against the backend method's signature (nothing is executed)."""
        method = getattr(self._instances[self._owner[call.name]], call.name)
        try:
            bound = inspect.signature(method).bind(*call.args, **call.kwargs)
        except TypeError as exc:
            raise CallParseError(f"{call.name}: {exc}") from None
        kwargs = {}
        for pname, value in bound.arguments.items():
            kind = inspect.signature(method).parameters[pname].kind
            if kind in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD):
                raise CallParseError(f"{call.name}: variadic parameters are not supported")
            kwargs[pname] = value
        return ParsedCall(call.name, (), kwargs)

    def _execute(self, call: ParsedCall) -> tuple[str, Optional[str]]:
        """Direct method dispatch on this episode's instance. Returns (result text, error or None)."""
        method = getattr(self._instances[self._owner[call.name]], call.name)
        try:
            result = method(**call.kwargs)
        except Exception as exc:  # the backend's own complaint, as bfcl_eval reports it
            text = f"Error during execution: {exc}"
            return text, text
        error = result.get("error") if isinstance(result, dict) else None
        return _format_result(result), (f"{call.name}: {error}" if error else None)

    def step(self, action: str) -> StepResult:
        if self._done:
            raise RuntimeError("bfcl env: step() after the episode ended; call reset()")
        try:
            payload = json.loads(action)
            raw_calls = payload.get("tool_calls") or []
            if not isinstance(raw_calls, list):
                raise TypeError
        except (json.JSONDecodeError, AttributeError, TypeError):
            return self.invalid_action(action, "malformed tool payload")
        if not raw_calls:
            return self._end_turn()
        self._steps_in_turn += 1
        calls = []
        try:
            for raw in raw_calls:
                if not isinstance(raw, dict):
                    raise CallParseError("a tool call must be an object with name and arguments")
                call = validate_arguments(raw.get("name"), raw.get("arguments", {}), self._available)
                calls.append(self._bind(call))
            rendered = [render_call(c) for c in calls]
        except CallParseError as exc:
            reason = f"rejected tool call: {exc}"
            return self._after_step(f"Error: {reason}. No function was executed.",
                                    {"invalid_action": True, "error": reason})
        lines, errors = [], []
        for call in calls:
            text, error = self._execute(call)
            lines.append(f"{call.name}: {text}" if len(calls) > 1 else text)
            if error:
                errors.append(error)
        self._decoded[self._turn].append(rendered)
        info = {"error": "; ".join(errors)} if errors else {}
        return self._after_step("\n".join(lines), info)

    def _after_step(self, observation: str, info: dict) -> StepResult:
        info.setdefault("turn", self._turn)
        if self._steps_in_turn > self.max_steps_per_turn:  # BFCL's force quit: the entry fails
            self._done = True
            reason = f"force_quit: more than {self.max_steps_per_turn} steps in user turn {self._turn}"
            info.update({"success": False, "checker": {"valid": False, "error_type": "force_quit",
                                                       "error_message": reason}})
            info["error"] = "; ".join(x for x in (info.get("error"), reason) if x)
            return StepResult(observation, 0.0, True, info)
        info.setdefault("anchor", observation)
        return StepResult(observation, 0.0, False, info)

    def _end_turn(self) -> StepResult:
        self._turn += 1
        self._steps_in_turn = 0
        if self._turn < len(self._turns):
            text = self._turn_text(self._turn)
            # observation_role: this observation is the user's next message, not a tool result
            return StepResult(text, 0.0, False, {"anchor": text, "turn": self._turn, "observation_role": "user"})
        self._done = True
        verdict = self.check()
        valid = bool(verdict.get("valid"))
        info = {"success": valid, "checker": verdict, "turn": self._turn - 1}
        if not valid:
            info["error"] = f"{verdict.get('error_type')}: {verdict.get('error_message')}"
        text = "All requests are finished." if valid else f"All requests are finished. Checker: {info['error']}"
        return StepResult(text, float(valid), True, info)

    def check(self) -> dict:
        """BFCL's multi_turn_checker on this episode's decoded calls, with instances that live only for this call."""
        utils, multi_turn_checker = _bfcl_modules()
        model_name = f"vh_{uuid.uuid4().hex}"
        try:
            verdict = multi_turn_checker(copy.deepcopy(self._decoded), self._gt, self._entry,
                                         f"multi_turn_{self.category}", model_name)
        except Exception as exc:  # an assertion inside the checker is a failed check, not an env crash
            verdict = {"valid": False, "error_type": "multi_turn:checker_exception",
                       "error_message": f"{type(exc).__name__}: {exc}"}
        finally:
            for key in [k for k in vars(utils) if k.startswith(model_name)]:
                delattr(utils, key)
        out = {"valid": bool(verdict.get("valid")), "error_type": verdict.get("error_type"),
               "error_message": verdict.get("error_message")}
        details = verdict.get("details") or {}
        if "differences" in details:
            out["differences"] = str(details["differences"])[:2000]
        if "missing_items" in details:
            out["missing_items"] = str(details["missing_items"])[:2000]
        return out

    # ---------------------------------------------------------------- oracle
    def ground_truth_calls(self, turn: int) -> list[dict]:
        """The ground truth of ``turn`` as Hermes calls ``{"name", "arguments"}`` (keyword arguments)."""
        calls = []
        for text in self._gt[turn]:
            for parsed in parse_python_calls(text, self._all_names):
                bound = self._bind(parsed)
                calls.append({"name": bound.name, "arguments": bound.kwargs})
        return calls

    def oracle_action(self) -> Optional[str]:
        if self._done or self._entry is None:
            return None
        if self._oracle_sent_turn != self._turn:
            self._oracle_sent_turn = self._turn
            calls = self.ground_truth_calls(self._turn)
            if calls:
                return json.dumps({"content": "", "tool_calls": calls})
        return json.dumps({"content": END_TURN_TEXT, "tool_calls": []})

    def close(self) -> None:
        self._instances = {}
        self._entry = None
        self._done = True
