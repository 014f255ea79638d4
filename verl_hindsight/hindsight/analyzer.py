"""HINT-SD analyzer, HERO reflector and SERL judge: a model reads a whole trajectory and says where it went wrong.

- HINT-SD analyzer (run only on failed episodes): up to ``k`` failure-relevant steps, earliest first, each with a
  short correction: ``{"failures": [{"step": s, "feedback": "..."}]}``. The ``single`` variant asks for the first
  mistaken step only (k = 1).
- HERO reflector: a per-turn diagnosis ``{"turns": [{"step": s, "necessary": bool, "valid": bool,
  "diagnosis": "...", "corrected_action": "..." | null}]}``; only turns with a non-empty diagnosis are kept.
- SERL judge: a 2-4 sentence summary of the episode in plain text that opens with ``This rollout succeeded.`` or
  ``This rollout failed.`` (the opening is the check that the model read the outcome); it is the hindsight text of
  every action turn of that episode.

Step numbering: the prompt shows **1-based** step numbers (``Step 1`` is the first turn) because models count
from one; the parsers accept ``1 <= step <= n_steps`` and return **0-based positions** into ``traj.turns``;
:func:`run_analyzer` / :func:`run_reflector` map positions to ``TurnRecord.turn``.

Parsing is strict and never raises. The answer may be wrapped in a fenced block or surrounded by prose: the first
balanced top-level ``{...}`` that is valid JSON is used (a small string-aware scanner, no ``eval``, so
Python-literal answers such as ``{'step': 1}`` are rejected as ``invalid_json``). An answer is dropped for that
trajectory, with a ``failure`` reason, on: ``invalid_json``, ``schema`` (missing key, wrong type, step not an
int), ``out_of_range``, ``duplicate_step`` or ``empty`` (no entries, or an analyzer entry with blank feedback).
More than ``k`` analyzer entries are *not* fatal: the answer is validated whole, then truncated to the ``k``
earliest steps and noted as ``too_many`` (the model did the job, only too generously). Over-long texts are
clipped to ``max_text_chars`` and noted as ``clipped``.

Answering models implement ``AnswerFn``: chat messages in, text out (sync, or async returning an awaitable):
:class:`OpenAICompatibleClient` (any ``/chat/completions`` endpoint, standard library only) and
:class:`RolloutServerAnswer` (the policy itself through verl's rollout server).
"""

from __future__ import annotations

import asyncio
import inspect
import json
import random
import re
import threading
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass
from typing import Any, Awaitable, Callable, Optional, Sequence, Union

from verl_hindsight.hindsight.records import Trajectory, TurnRecord

Messages = list[dict[str, str]]
# Chat messages in, answer text out; may also return an awaitable of the text (async clients).
AnswerFn = Callable[[Messages], Union[str, Awaitable[str]]]

FAILURE_REASONS = ("invalid_json", "schema", "out_of_range", "duplicate_step", "empty", "too_many")
ANSWER_ERROR = "answer_error"
DEFAULT_MAX_TEXT_CHARS = 600
# Longer answers are scanned only up to here: bounds the work an adversarial (runaway) answer can cause.
MAX_ANSWER_SCAN_CHARS = 100_000
MAX_JSON_CANDIDATES = 64
_OPENERS = re.compile(r"[{\[]")

# ---------------------------------------------------------------------------------------------------------------
# Rendering
# ---------------------------------------------------------------------------------------------------------------

CLIP_MARKER = "[... earlier steps clipped ...]\n"


def _clip_middle(text: str, max_chars: int) -> str:
    """Keep head and tail of one over-long field so a single huge observation cannot eat the whole budget."""
    if len(text) <= max_chars:
        return text
    half = max(1, (max_chars - 20) // 2)
    return f"{text[:half]} [... clipped ...] {text[-half:]}"


def _fmt_num(x: float) -> str:
    return f"{x:g}"


def _render_step(pos: int, t: TurnRecord, prev_answer: Optional[str], field_chars: int) -> list[str]:
    """Lines of one step; the observation is omitted when it repeats the previous environment answer."""
    lines = [f"Step {pos + 1}:"]
    if t.observation and t.observation != prev_answer:
        lines.append(f"Observation: {_clip_middle(t.observation, field_chars)}")
    if t.action is not None:
        lines.append(f"Action: {_clip_middle(t.action, field_chars)}")
    else:
        why = f" ({t.parse_error})" if t.parse_error else ""
        lines.append(f"Action: (no valid action){why}")
    if t.error:
        lines.append(f"Environment error: {_clip_middle(t.error, field_chars)}")
    answer = t.feedback or t.next_observation
    if answer and answer != t.error:
        lines.append(f"Environment answer: {_clip_middle(answer, field_chars)}")
    status = f"Reward: {_fmt_num(t.reward)}"
    if t.done:
        status += " | episode ended"
    if t.truncated:
        status += " | response truncated"
    lines.append(status)
    return lines


def render_trajectory(traj: Trajectory, max_chars: int = 12000, field_chars: int = 3000) -> str:
    """Compact deterministic text of an episode: task, numbered steps (1-based), final outcome.

    Clipped from the start so the end (the failure and the outcome) survives, as in HINT-SD (12,000 chars).
    """
    lines = [f"Environment: {traj.env or 'unknown'} | Task id: {traj.task_id or 'unknown'}"]
    if traj.turns:
        lines.append(f"Task (initial observation):\n{_clip_middle(traj.turns[0].observation, field_chars)}")
    prev_answer: Optional[str] = traj.turns[0].observation if traj.turns else None
    for pos, t in enumerate(traj.turns):
        lines.append("")
        lines.extend(_render_step(pos, t, prev_answer, field_chars))
        prev_answer = t.feedback or t.next_observation
    outcome = "success" if traj.success else "failure"
    lines.append("")
    lines.append(
        f"Final outcome: {outcome} | return {_fmt_num(traj.episode_return)} | {len(traj.turns)} steps"
    )
    text = "\n".join(lines)
    if len(text) <= max_chars:
        return text
    keep = max(0, max_chars - len(CLIP_MARKER))
    return CLIP_MARKER[:max_chars] + (text[-keep:] if keep else "")


# ---------------------------------------------------------------------------------------------------------------
# Prompts
# ---------------------------------------------------------------------------------------------------------------

_ANALYZER_MULTI = """You review a failed episode of an agent acting in an environment. Find at most {k} steps \
where the agent went wrong and caused or contributed to the failure: a wrong or invalid action, wrong arguments, \
a missing or unnecessary step, or ignoring what the environment said. Give between 1 and {k} steps, ordered \
earliest first, each step at most once.
For each chosen step write a correction addressed to the agent, in fewer than three sentences, saying what it \
should have done at that step instead. Each correction must be specific to its own step.
Steps are numbered as in the episode text (Step 1 is the first step).
Reply with valid JSON only, exactly in this form:
{{"failures": [{{"step": <step number>, "feedback": "<correction>"}}]}}"""

_ANALYZER_SINGLE = """You review a failed episode of an agent acting in an environment. Find the FIRST step \
where the agent went wrong and caused or contributed to the failure: a wrong or invalid action, wrong arguments, \
a missing or unnecessary step, or ignoring what the environment said.
Write a correction addressed to the agent, in fewer than three sentences, saying what it should have done at \
that step instead.
Steps are numbered as in the episode text (Step 1 is the first step).
Reply with valid JSON only, exactly in this form:
{"failures": [{"step": <step number>, "feedback": "<correction>"}]}"""

_REFLECTOR = """You review an episode of an agent acting in an environment, one step at a time. For every step, \
use what the environment answered and the final outcome to judge the action:
- necessary: did the step help towards solving the task (false if redundant or a detour)?
- valid: was the action well-formed and accepted by the environment?
- diagnosis: if the step was a mistake, say in fewer than three sentences why it failed or was wasted; use an \
empty string when the step was fine.
- corrected_action: the action the agent should have taken instead, or null when no correction is needed.
Steps are numbered as in the episode text (Step 1 is the first step).
Reply with valid JSON only, exactly in this form:
{"turns": [{"step": <step number>, "necessary": true, "valid": true, "diagnosis": "", "corrected_action": null}]}"""


JUDGE_PREFIXES = ("This rollout succeeded.", "This rollout failed.")

_JUDGE = """You review one episode of an agent acting in an environment.
Write a summary of 2 to 4 sentences for the agent: what went right or wrong, and what it should do differently.
Start with exactly "This rollout succeeded." if the final outcome is a success, else with exactly \
"This rollout failed."
Reply with the summary only."""


def analyzer_messages(traj: Trajectory, k: int = 3, variant: str = "multi", max_chars: int = 12000) -> Messages:
    """HINT-SD analyzer chat: a system instruction and the rendered episode as the user message."""
    if variant == "multi":
        system = _ANALYZER_MULTI.format(k=k)
    elif variant == "single":
        system = _ANALYZER_SINGLE
    else:
        raise ValueError(f"analyzer variant must be 'multi' or 'single', got {variant!r}")
    user = f"Episode:\n{render_trajectory(traj, max_chars=max_chars)}\n\nAnswer with the JSON object only."
    return [{"role": "system", "content": system}, {"role": "user", "content": user}]


def reflector_messages(traj: Trajectory, max_chars: int = 12000) -> Messages:
    """HERO reflector chat: a per-step diagnosis request and the rendered episode."""
    user = (
        f"Episode:\n{render_trajectory(traj, max_chars=max_chars)}\n\n"
        f"Diagnose each of the {len(traj.turns)} steps. Answer with the JSON object only."
    )
    return [{"role": "system", "content": _REFLECTOR}, {"role": "user", "content": user}]


def judge_messages(traj: Trajectory, max_chars: int = 12000) -> Messages:
    """SERL judge chat: the summary request and the rendered episode."""
    user = f"Episode:\n{render_trajectory(traj, max_chars=max_chars)}\n\nAnswer with the summary only."
    return [{"role": "system", "content": _JUDGE}, {"role": "user", "content": user}]


# ---------------------------------------------------------------------------------------------------------------
# JSON extraction and parsing
# ---------------------------------------------------------------------------------------------------------------


def _balanced_end(text: str, start: int) -> int:
    """Index just past the ``}`` closing the ``{`` at ``start``, or -1; braces inside JSON strings are ignored."""
    depth = 0
    in_string = False
    escaped = False
    for i in range(start, len(text)):
        c = text[i]
        if in_string:
            if escaped:
                escaped = False
            elif c == "\\":
                escaped = True
            elif c == '"':
                in_string = False
        elif c == '"':
            in_string = True
        elif c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
            if depth == 0:
                return i + 1
    return -1


def extract_json_object(text: str) -> Optional[dict]:
    """The first balanced top-level ``{...}`` of ``text`` that parses as a JSON object, else None.

    A ``{`` candidate that fails to parse is skipped *whole* (we never descend into it), so a broken outer object
    cannot be replaced by a fragment of itself; likewise a top-level JSON array is skipped whole, so
    ``[{"step": 1, ...}]`` is not mistaken for an object answer. Non-standard constants (NaN, Infinity) are
    refused. At most ``MAX_JSON_CANDIDATES`` candidates are tried, bounding the work on adversarial answers.
    """
    text = text[:MAX_ANSWER_SCAN_CHARS]
    decoder = json.JSONDecoder(parse_constant=_refuse_constant)
    match = _OPENERS.search(text)
    for _ in range(MAX_JSON_CANDIDATES):
        if match is None:
            return None
        pos = match.start()
        if text[pos] == "{":
            end = _balanced_end(text, pos)
            if end == -1:
                return None  # unbalanced until the end: nothing later can be top-level
            obj = _loads(decoder, text[pos:end])
            if isinstance(obj, dict):
                return obj
        else:
            end = _array_end(decoder, text, pos)
        match = _OPENERS.search(text, end)
    return None


def _loads(decoder: json.JSONDecoder, candidate: str) -> Any:
    try:
        return decoder.decode(candidate)
    except (ValueError, RecursionError):
        return None


def _array_end(decoder: json.JSONDecoder, text: str, pos: int) -> int:
    """Where to resume after a ``[``: past the array if one parses there, else the next character (prose)."""
    try:
        _, end = decoder.raw_decode(text, pos)
        return end
    except (ValueError, RecursionError):
        return pos + 1


def _refuse_constant(name: str):
    raise ValueError(f"non-standard JSON constant {name}")


@dataclass(frozen=True)
class AnalyzerResult:
    """Parsed analyzer answer: (0-based position, correction) earliest first; empty with ``failure`` if dropped."""

    steps: tuple[tuple[int, str], ...] = ()
    failure: Optional[str] = None
    notes: tuple[str, ...] = ()  # non-fatal: "too_many", "clipped"

    @property
    def ok(self) -> bool:
        return self.failure is None


@dataclass(frozen=True)
class TurnDiagnosis:
    turn: int  # 0-based position in the parser's result; TurnRecord.turn after run_reflector
    necessary: bool
    valid: bool
    diagnosis: str
    corrected_action: Optional[str]


@dataclass(frozen=True)
class ReflectorResult:
    """Parsed reflector answer: diagnoses with non-empty text, earliest first; empty with ``failure`` if dropped."""

    turns: tuple[TurnDiagnosis, ...] = ()
    failure: Optional[str] = None
    notes: tuple[str, ...] = ()  # non-fatal: "clipped"

    @property
    def ok(self) -> bool:
        return self.failure is None


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)  # JSON true must not pass as step 1


def _entries(text: Any, key: str) -> tuple[Optional[list], Optional[str]]:
    """The list under ``key`` of the answer's JSON object, or a failure reason."""
    if not isinstance(text, str):
        return None, "invalid_json"
    obj = extract_json_object(text)
    if obj is None:
        return None, "invalid_json"
    entries = obj.get(key)
    if not isinstance(entries, list):
        return None, "schema"
    if not entries:
        return None, "empty"
    return entries, None


def _check_steps(steps: list[int], n_steps: int) -> Optional[str]:
    """Range then uniqueness of 1-based steps: either invalidates the whole answer."""
    if any(not 1 <= s <= n_steps for s in steps):
        return "out_of_range"
    if len(set(steps)) != len(steps):
        return "duplicate_step"
    return None


def _clip_text(text: str, max_chars: int) -> tuple[str, bool]:
    text = text.strip()
    return (text[:max_chars].rstrip(), True) if len(text) > max_chars else (text, False)


def parse_analyzer_answer(
    text: str, n_steps: int, k: int, max_text_chars: int = DEFAULT_MAX_TEXT_CHARS
) -> AnalyzerResult:
    """Strictly parse ``{"failures": [{"step": s, "feedback": "..."}]}`` (1-based steps); never raises."""
    entries, failure = _entries(text, "failures")
    if failure:
        return AnalyzerResult(failure=failure)
    for e in entries:
        if not isinstance(e, dict) or not _is_int(e.get("step")) or not isinstance(e.get("feedback"), str):
            return AnalyzerResult(failure="schema")
    steps = [e["step"] for e in entries]
    failure = _check_steps(steps, n_steps)
    if failure:
        return AnalyzerResult(failure=failure)
    if any(not e["feedback"].strip() for e in entries):
        return AnalyzerResult(failure="empty")
    notes: list[str] = []
    picked = sorted(entries, key=lambda e: e["step"])
    if len(picked) > k:
        picked = picked[:k]  # keep the earliest k: earlier mistakes cause the later ones
        notes.append("too_many")
    out = []
    for e in picked:
        fb, clipped = _clip_text(e["feedback"], max_text_chars)
        if clipped and "clipped" not in notes:
            notes.append("clipped")
        out.append((e["step"] - 1, fb))
    return AnalyzerResult(steps=tuple(out), notes=tuple(notes))


def _optional_str(x: Any) -> bool:
    return x is None or isinstance(x, str)


def parse_reflector_answer(
    text: str, n_steps: int, max_text_chars: int = DEFAULT_MAX_TEXT_CHARS
) -> ReflectorResult:
    """Strictly parse ``{"turns": [...]}`` (1-based steps); never raises.

    Steps may be missing from the answer (no diagnosis for them). An empty ``diagnosis`` means "this step was fine":
    valid, but the turn is not kept. ``corrected_action`` is optional: missing, null or blank all mean None.
    """
    entries, failure = _entries(text, "turns")
    if failure:
        return ReflectorResult(failure=failure)
    for e in entries:
        if not (
            isinstance(e, dict)
            and _is_int(e.get("step"))
            and isinstance(e.get("necessary"), bool)
            and isinstance(e.get("valid"), bool)
            and isinstance(e.get("diagnosis"), str)
            and _optional_str(e.get("corrected_action"))
        ):
            return ReflectorResult(failure="schema")
    failure = _check_steps([e["step"] for e in entries], n_steps)
    if failure:
        return ReflectorResult(failure=failure)
    notes: list[str] = []
    out = []
    for e in sorted(entries, key=lambda e: e["step"]):
        diagnosis, c1 = _clip_text(e["diagnosis"], max_text_chars)
        if not diagnosis:
            continue
        action, c2 = _clip_text(e.get("corrected_action") or "", max_text_chars)
        if (c1 or c2) and "clipped" not in notes:
            notes.append("clipped")
        out.append(TurnDiagnosis(e["step"] - 1, e["necessary"], e["valid"], diagnosis, action or None))
    return ReflectorResult(turns=tuple(out), notes=tuple(notes))


# ---------------------------------------------------------------------------------------------------------------
# Answering models
# ---------------------------------------------------------------------------------------------------------------


class AnswerError(RuntimeError):
    """The answering model could not be reached or gave no usable text."""


# Answers worth asking again: rate limits, server-side failures and gateways that time out. Anything else (a bad
# request, a wrong key, an unknown model) fails the same way every time.
RETRY_HTTP_CODES = frozenset({408, 409, 429, 500, 502, 503, 504})
MAX_RETRY_WAIT_S = 60.0


class _Retryable(Exception):
    def __init__(self, error: "AnswerError", wait_hint: Optional[float] = None):
        super().__init__(str(error))
        self.error = error
        self.wait_hint = wait_hint


class OpenAICompatibleClient:
    """``POST {base_url}/chat/completions`` with the standard library; a sync :data:`AnswerFn`.

    A rate limit (429), a 5xx, a timeout or a refused connection is asked again up to ``retries`` times, waiting
    ``retry_backoff_s * 2**attempt`` (with 10% jitter, so parallel episodes do not retry in step) or the server's
    ``Retry-After``, at most :data:`MAX_RETRY_WAIT_S`; then the last error is raised as :class:`AnswerError`
    (counted as ``answer_error`` by the callers, as before).
    """

    def __init__(
        self,
        base_url: str,
        model: str,
        api_key: Optional[str] = None,
        timeout_s: float = 60.0,
        max_tokens: int = 512,
        temperature: float = 0.6,
        retries: int = 3,
        retry_backoff_s: float = 1.0,
    ):
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model = model
        self.api_key = api_key
        self.timeout_s = timeout_s
        self.max_tokens = max_tokens
        self.temperature = temperature
        self.retries = retries
        self.retry_backoff_s = retry_backoff_s
        self.attempts = 0  # requests sent, retries included

    def _request(self, messages: Messages) -> urllib.request.Request:
        body = {
            "model": self.model,
            "messages": messages,
            "max_tokens": self.max_tokens,
            "temperature": self.temperature,
        }
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        return urllib.request.Request(self.url, data=json.dumps(body).encode(), headers=headers, method="POST")

    def __call__(self, messages: Messages) -> str:
        for attempt in range(self.retries + 1):
            try:
                return self._content(self._post(messages))
            except _Retryable as e:
                if attempt == self.retries:
                    raise e.error from e.__cause__
                wait = self.retry_backoff_s * 2 ** attempt * (1.0 + 0.1 * random.random())
                time.sleep(min(MAX_RETRY_WAIT_S, e.wait_hint if e.wait_hint is not None else wait))
        raise AssertionError("unreachable")

    def _post(self, messages: Messages) -> bytes:
        self.attempts += 1
        try:
            with urllib.request.urlopen(self._request(messages), timeout=self.timeout_s) as resp:
                return resp.read()
        except urllib.error.HTTPError as e:
            detail = e.read()[:500].decode("utf-8", "replace")
            error = AnswerError(f"{self.url} returned HTTP {e.code}: {detail}")
            if e.code in RETRY_HTTP_CODES:
                raise _Retryable(error, _retry_after(e.headers.get("Retry-After"))) from e
            raise error from e
        except (TimeoutError, OSError) as e:  # socket.timeout is TimeoutError; URLError is an OSError
            reason = getattr(e, "reason", e)
            if isinstance(reason, TimeoutError) or isinstance(e, TimeoutError):
                raise _Retryable(AnswerError(f"{self.url} did not answer within {self.timeout_s}s")) from e
            raise _Retryable(AnswerError(f"cannot reach {self.url}: {reason}")) from e

    def _content(self, raw: bytes) -> str:
        try:
            content = json.loads(raw)["choices"][0]["message"]["content"]
        except (ValueError, KeyError, IndexError, TypeError) as e:
            raise AnswerError(f"{self.url} gave no chat completion: {raw[:300]!r}") from e
        if not isinstance(content, str):
            raise AnswerError(f"{self.url} gave a completion without text content")
        return content


def _retry_after(value: Optional[str]) -> Optional[float]:
    """Seconds from a ``Retry-After`` header given in seconds; None for a date or garbage (the backoff applies)."""
    try:
        return max(0.0, float(value)) if value is not None else None
    except ValueError:
        return None


def _ids_from_template(rendered: Any) -> list[int]:
    """Prompt ids from ``apply_chat_template(tokenize=True)``: a list, or (transformers 5) a BatchEncoding."""
    if hasattr(rendered, "keys") and "input_ids" in rendered:
        rendered = rendered["input_ids"]
    if hasattr(rendered, "tolist"):
        rendered = rendered.tolist()
    if rendered and isinstance(rendered[0], (list, tuple)):  # a batch of one
        rendered = rendered[0]
    return [int(t) for t in rendered]


class RolloutServerAnswer:
    """The policy answers through the rollout server: an async :data:`AnswerFn`.

    ``generate(prompt_ids, sampling_params)`` returns token ids, or an object with ``.token_ids`` (sync or async).
    Use :meth:`from_server_manager` for verl's ``server_manager.generate(request_id=, prompt_ids=, sampling_params=)``.
    Defaults follow HINT-SD's analyzer sampling (T 0.6, top-p 0.95, <= 512 new tokens).
    """

    def __init__(self, tokenizer, generate: Callable[..., Any], sampling_params: Optional[dict] = None,
                 max_prompt_tokens: Optional[int] = None):
        self.tokenizer = tokenizer
        self.generate = generate
        self.sampling_params = dict(sampling_params or {"temperature": 0.6, "top_p": 0.95, "max_tokens": 512})
        self.max_prompt_tokens = max_prompt_tokens

    @classmethod
    def from_server_manager(cls, tokenizer, server_manager, **kwargs) -> "RolloutServerAnswer":
        async def generate(prompt_ids, sampling_params):
            return await server_manager.generate(
                request_id=f"hs-analyzer-{uuid.uuid4().hex}", prompt_ids=prompt_ids, sampling_params=sampling_params
            )

        return cls(tokenizer, generate, **kwargs)

    def prompt_ids(self, messages: Messages) -> list[int]:
        rendered = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        ids = _ids_from_template(rendered)
        if self.max_prompt_tokens is not None and len(ids) > self.max_prompt_tokens:
            # Refuse rather than cut: a cut prompt would lose the instruction or the episode's end.
            raise AnswerError(f"analyzer prompt has {len(ids)} tokens > max_prompt_tokens={self.max_prompt_tokens}")
        return ids

    async def answer(self, messages: Messages) -> str:
        out = self.generate(self.prompt_ids(messages), dict(self.sampling_params))
        if inspect.isawaitable(out):
            out = await out
        token_ids = getattr(out, "token_ids", out)
        return self.tokenizer.decode(list(token_ids), skip_special_tokens=True)

    def __call__(self, messages: Messages) -> Awaitable[str]:
        return self.answer(messages)


# ---------------------------------------------------------------------------------------------------------------
# Running over a batch
# ---------------------------------------------------------------------------------------------------------------


def _eligible(traj: Trajectory, only_failed: bool) -> bool:
    """Environment failures and empty episodes get no hindsight; successes only when asked for."""
    if traj.failure or not traj.turns:
        return False
    return not (only_failed and traj.success)


async def _call(answer_fn: AnswerFn, messages: Messages, sem: asyncio.Semaphore) -> str:
    """One answer; sync functions run in a thread so several requests can be in flight."""
    async with sem:
        if inspect.iscoroutinefunction(answer_fn) or inspect.iscoroutinefunction(getattr(answer_fn, "__call__", None)):
            out = answer_fn(messages)
        else:
            out = await asyncio.to_thread(answer_fn, messages)
        if inspect.isawaitable(out):
            out = await out
    return out


async def _answers(items: list[tuple[int, Messages]], answer_fn: AnswerFn, concurrency: int) -> dict[int, Any]:
    """Answer text per trajectory index, or the exception it raised."""
    sem = asyncio.Semaphore(max(1, concurrency))
    results = await asyncio.gather(*(_call(answer_fn, m, sem) for _, m in items), return_exceptions=True)
    return {i: r for (i, _), r in zip(items, results)}


def _run_sync(coro):
    """Run a coroutine from sync code, also when an event loop is already running in this thread."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    box: dict[str, Any] = {}

    def target():
        try:
            box["value"] = asyncio.run(coro)
        except BaseException as e:  # re-raised in the caller's thread
            box["error"] = e

    th = threading.Thread(target=target, daemon=True)
    th.start()
    th.join()
    if "error" in box:
        raise box["error"]
    return box["value"]


def _empty_metrics(prefix: str) -> dict[str, float]:
    m = {f"hindsight/{prefix}_{name}": 0 for name in ("calls", "parse_failures", "steps_selected", "skipped",
                                                      "too_many", "clipped")}
    for reason in (*FAILURE_REASONS, ANSWER_ERROR):
        m[f"hindsight/{prefix}_failure/{reason}"] = 0
    return m


def _count(metrics: dict, prefix: str, result) -> None:
    """Count one parsed answer: a fatal failure, or its non-fatal notes."""
    if result.failure:
        metrics[f"hindsight/{prefix}_parse_failures"] += 1
        metrics[f"hindsight/{prefix}_failure/{result.failure}"] += 1
    for note in result.notes:
        metrics[f"hindsight/{prefix}_{note}"] += 1


async def _ask_eligible(prefix: str, trajectories: Sequence[Trajectory], answer_fn: AnswerFn, only_failed: bool,
                        concurrency: int, messages: Callable[[Trajectory], Messages],
                        wanted: Callable[[Trajectory], bool] = lambda t: True) -> tuple[dict[int, Any], dict]:
    """Ask about every eligible trajectory (``wanted`` narrows it further); ``(answer text per index, metrics)`` with
    ``{prefix}_calls``, ``_skipped`` and raised answers counted as ``answer_error`` (and left out)."""
    metrics = _empty_metrics(prefix)
    items = []
    for i, t in enumerate(trajectories):
        if _eligible(t, only_failed) and wanted(t):
            items.append((i, messages(t)))
        else:
            metrics[f"hindsight/{prefix}_skipped"] += 1
    metrics[f"hindsight/{prefix}_calls"] = len(items)
    texts = {}
    for i, answer in (await _answers(items, answer_fn, concurrency)).items():
        if isinstance(answer, BaseException):
            metrics[f"hindsight/{prefix}_failure/{ANSWER_ERROR}"] += 1
        else:
            texts[i] = answer
    return texts, metrics


async def arun_analyzer(
    trajectories: Sequence[Trajectory],
    answer_fn: AnswerFn,
    k: int = 3,
    variant: str = "multi",
    only_failed: bool = True,
    concurrency: int = 8,
    max_chars: int = 12000,
) -> tuple[dict[int, list[tuple[int, str]]], dict[str, float]]:
    """Async :func:`run_analyzer`."""
    k_eff = 1 if variant == "single" else k  # the single variant asks for the first mistake only
    answers, metrics = await _ask_eligible(
        "analyzer", trajectories, answer_fn, only_failed, concurrency,
        lambda t: analyzer_messages(t, k=k_eff, variant=variant, max_chars=max_chars))
    out: dict[int, list[tuple[int, str]]] = {}
    for i, answer in answers.items():
        turns = trajectories[i].turns
        result = parse_analyzer_answer(answer, len(turns), k_eff)
        _count(metrics, "analyzer", result)
        if result.ok:
            out[i] = [(turns[pos].turn, fb) for pos, fb in result.steps]
            metrics["hindsight/analyzer_steps_selected"] += len(result.steps)
    return out, metrics


def run_analyzer(
    trajectories: Sequence[Trajectory],
    answer_fn: AnswerFn,
    k: int = 3,
    variant: str = "multi",
    only_failed: bool = True,
    concurrency: int = 8,
    max_chars: int = 12000,
) -> tuple[dict[int, list[tuple[int, str]]], dict[str, float]]:
    """HINT-SD analyzer over a batch: ``{traj_index: [(TurnRecord.turn, correction), ...]}`` and metrics.

    Only eligible trajectories are asked (failed ones by default; never environment failures or empty ones).
    A trajectory whose answer raised (``answer_error``) or failed to parse is absent from the result; nothing
    here raises for a bad answer.
    """
    return _run_sync(arun_analyzer(trajectories, answer_fn, k, variant, only_failed, concurrency, max_chars))


async def arun_reflector(
    trajectories: Sequence[Trajectory],
    answer_fn: AnswerFn,
    only_failed: bool = False,
    concurrency: int = 8,
    max_chars: int = 12000,
) -> tuple[dict[int, list[TurnDiagnosis]], dict[str, float]]:
    """Async :func:`run_reflector`."""
    answers, metrics = await _ask_eligible("reflector", trajectories, answer_fn, only_failed, concurrency,
                                           lambda t: reflector_messages(t, max_chars=max_chars))
    out: dict[int, list[TurnDiagnosis]] = {}
    for i, answer in answers.items():
        turns = trajectories[i].turns
        result = parse_reflector_answer(answer, len(turns))
        _count(metrics, "reflector", result)
        if result.ok and result.turns:
            out[i] = [
                TurnDiagnosis(turns[d.turn].turn, d.necessary, d.valid, d.diagnosis, d.corrected_action)
                for d in result.turns
            ]
            metrics["hindsight/reflector_steps_selected"] += len(result.turns)
    return out, metrics


def run_reflector(
    trajectories: Sequence[Trajectory],
    answer_fn: AnswerFn,
    only_failed: bool = False,
    concurrency: int = 8,
    max_chars: int = 12000,
) -> tuple[dict[int, list[TurnDiagnosis]], dict[str, float]]:
    """HERO reflector over a batch: ``{traj_index: [TurnDiagnosis(turn=TurnRecord.turn, ...)]}`` and metrics.

    Unlike the analyzer, successful episodes are diagnosed too by default (HERO reflects on every rollout:
    a successful episode can still hold unnecessary or invalid turns). Only turns with a non-empty diagnosis are
    kept; a trajectory with none is absent from the result.
    """
    return _run_sync(arun_reflector(trajectories, answer_fn, only_failed, concurrency, max_chars))


def parse_judge_answer(text: Any, max_chars: int = DEFAULT_MAX_TEXT_CHARS) -> tuple[Optional[str], Optional[str],
                                                                                     tuple[str, ...]]:
    """``(summary, failure, notes)``: the stripped summary, or None with ``schema`` (not text, or not opening
    with one of :data:`JUDGE_PREFIXES`) or ``empty``; an over-long summary is clipped and noted ``clipped``."""
    if not isinstance(text, str):
        return None, "schema", ()
    text = text.strip()
    if not text:
        return None, "empty", ()
    if not text.startswith(JUDGE_PREFIXES):
        return None, "schema", ()
    clipped, was_clipped = _clip_text(text, max_chars)
    return clipped, None, (("clipped",) if was_clipped else ())


async def arun_judge(
    trajectories: Sequence[Trajectory],
    answer_fn: AnswerFn,
    only_failed: bool = False,
    concurrency: int = 8,
    max_chars: int = 12000,
) -> tuple[dict[int, str], dict[str, float]]:
    """SERL judge over a batch: ``{traj_index: summary}`` and ``hindsight/judge_*`` metrics. Episodes with no
    action turn are skipped (the summary would reach no token); a raised or unusable answer is counted, never
    raised, and leaves the trajectory out."""
    answers, metrics = await _ask_eligible("judge", trajectories, answer_fn, only_failed, concurrency,
                                           lambda t: judge_messages(t, max_chars=max_chars),
                                           wanted=lambda t: any(turn.has_action for turn in t.turns))
    out: dict[int, str] = {}
    for i, answer in answers.items():
        summary, failure, notes = parse_judge_answer(answer)
        if failure:
            metrics["hindsight/judge_parse_failures"] += 1
            metrics[f"hindsight/judge_failure/{failure}"] += 1
        for note in notes:
            metrics[f"hindsight/judge_{note}"] += 1
        if summary is not None:
            out[i] = summary
            metrics["hindsight/judge_steps_selected"] += sum(1 for turn in trajectories[i].turns if turn.has_action)
    return out, metrics


def run_judge(
    trajectories: Sequence[Trajectory],
    answer_fn: AnswerFn,
    only_failed: bool = False,
    concurrency: int = 8,
    max_chars: int = 12000,
) -> tuple[dict[int, str], dict[str, float]]:
    """Sync :func:`arun_judge`."""
    return _run_sync(arun_judge(trajectories, answer_fn, only_failed, concurrency, max_chars))
