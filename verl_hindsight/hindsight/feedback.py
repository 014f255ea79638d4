"""Hindsight feedback sources and their placement (SERL's five sources, turn- or anchor-level).

A *feedback source* reads one GRPO group (the rollouts of one task, same ``uid``) and returns the hindsight text
the self-teacher sees for each (trajectory index within the group, turn index); turns without feedback are simply
absent. Sources are small registered functions so a new one is one decorator away, and combinations are named
with ``+`` (``"successful_sibling+immediate"``, SERL's best variant).

*Placement* decides where a text applies: turn-level (each turn keeps its own text) or anchor-level (turns of the
group that saw the same raw observation are pooled and each sees every sibling action tried there).

Rules shared by every source:
- only action turns (``TurnRecord.has_action``) get feedback: nothing else can ever be targeted;
- trajectories whose environment failed (``Trajectory.failure``) neither get feedback nor lend it to siblings,
  because their records cannot be trusted.
"""

from __future__ import annotations

import difflib
from typing import Callable, Optional

from verl_hindsight.config import FeedbackConfig
from verl_hindsight.hindsight.records import Trajectory, TurnRecord, group_by_uid

Key = tuple[int, int]  # (trajectory index, turn index)
FeedbackSource = Callable[[list[Trajectory]], dict[Key, str]]

JOIN = "\n\n"  # between the parts of a combined source
STEP_CHARS = 300  # per-step clip in the compact renderings: one huge observation must not crowd out the rest
NO_ACTION = "(no valid action)"

# ---------------------------------------------------------------------------------------------------------------
# Registry
# ---------------------------------------------------------------------------------------------------------------

_REGISTRY: dict[str, FeedbackSource] = {}


def register_feedback_source(name: str):
    """Decorator registering a source under ``name``."""
    if not name or "+" in name:
        raise ValueError(f"invalid feedback source name {name!r}: non-empty, without '+'")

    def decorate(fn: Callable) -> Callable:
        if name in _REGISTRY:
            raise ValueError(f"feedback source {name!r} is already registered")
        _REGISTRY[name] = fn
        return fn

    return decorate


def feedback_source_names() -> list[str]:
    return sorted(_REGISTRY)


def _lookup(name: str) -> FeedbackSource:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise KeyError(f"unknown feedback source {name!r}; known: {', '.join(feedback_source_names())} "
                       "(combine them with '+')") from None


def _split(name: str) -> list[str]:
    parts = [p.strip() for p in name.split("+")]
    if not name or any(not p for p in parts):
        raise KeyError(f"malformed feedback source name {name!r}; known: {', '.join(feedback_source_names())}")
    return parts


def get_feedback_source(name: str) -> FeedbackSource:
    """The source called ``name``; ``"a+b"`` joins the non-empty texts of a and b (in that order) per turn. Raises
    KeyError naming the registered sources for an unknown or malformed name."""
    parts = [_lookup(part) for part in _split(name)]
    return parts[0] if len(parts) == 1 else CombinedSource(parts)


class CombinedSource:
    """Several sources joined per turn."""

    def __init__(self, parts: list[FeedbackSource]):
        self.parts = parts

    def __call__(self, group: list[Trajectory]) -> dict[Key, str]:
        outputs = [p(group) for p in self.parts]
        keys = sorted(set().union(*outputs))
        joined = {k: JOIN.join(o[k] for o in outputs if o.get(k)) for k in keys}
        return {k: v for k, v in joined.items() if v}


# ---------------------------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------------------------


def is_action_turn(t: TurnRecord) -> bool:
    return t.has_action


def _live(group: list[Trajectory]) -> list[tuple[int, Trajectory]]:
    """Trajectories whose environment did not fail, with their index in the group."""
    return [(i, tr) for i, tr in enumerate(group) if not tr.failure]


def _one_line(text: str, max_chars: int = STEP_CHARS) -> str:
    """Whitespace collapsed to one line and clipped, so step lists stay compact and deterministic."""
    text = " ".join(text.split())
    return text if len(text) <= max_chars else text[: max_chars - 1] + "…"


def _action_text(t: TurnRecord) -> str:
    return _one_line(t.action) if t.action is not None else NO_ACTION


def _env_answer(t: TurnRecord) -> str:
    # the record's ``feedback`` already is "error if any, else next observation"
    return _one_line(t.feedback or t.next_observation)


def _outcome(tr: Trajectory) -> str:
    return f"Outcome: {'succeeded' if tr.success else 'failed'} (return {tr.episode_return:g})."


def _per_turn(group: list[Trajectory], text_of: Callable[[TurnRecord], str]) -> dict[Key, str]:
    out = {}
    for i, tr in _live(group):
        for t in tr.turns:
            text = text_of(t) if is_action_turn(t) else ""
            if text:
                out[(i, t.turn)] = text
    return out


def clip_start(text: str, max_chars: Optional[int]) -> str:
    """Keep the end of ``text`` (where outcomes and the latest answers are), marking the cut with '…'."""
    if max_chars is None or len(text) <= max_chars:
        return text
    return "…" + text[len(text) - max_chars + 1:] if max_chars > 1 else text[-max_chars:]


# ---------------------------------------------------------------------------------------------------------------
# Sources
# ---------------------------------------------------------------------------------------------------------------


@register_feedback_source("immediate")
def immediate_feedback(group: list[Trajectory]) -> dict[Key, str]:
    """The environment's answer right after the action (its error if any, else the next observation)."""
    return _per_turn(group, lambda t: t.feedback)


@register_feedback_source("error")
def error_feedback(group: list[Trajectory]) -> dict[Key, str]:
    """Only the environment's complaints (``info["error"]``): the turns where the environment says what went wrong.

    The failing step with the environment's own correction: what an analyzer would pick when the environment
    already explains the failure (used where the policy is too weak to be its own analyzer, e.g. the CPU demo).
    """
    return _per_turn(group, lambda t: t.error or "")


@register_feedback_source("next_observation")
def next_observation_feedback(group: list[Trajectory]) -> dict[Key, str]:
    """The full next prompt the agent saw after acting."""
    return _per_turn(group, lambda t: t.next_observation)


def render_future(tr: Trajectory, from_pos: int) -> str:
    """This step and every later one as "Step n: <action> -> <answer>", then the outcome (steps 1-based)."""
    lines = [f"Step {pos + 1}: {_action_text(t)} -> {_env_answer(t)}"
             for pos, t in enumerate(tr.turns) if pos >= from_pos]
    return "\n".join(lines + [_outcome(tr)])


@register_feedback_source("future")
def future_feedback(group: list[Trajectory]) -> dict[Key, str]:
    """The rest of the same trajectory from the turn on, ending with the outcome."""
    out = {}
    for i, tr in _live(group):
        for pos, t in enumerate(tr.turns):
            if is_action_turn(t):
                out[(i, t.turn)] = render_future(tr, pos)
    return out


def render_actions(tr: Trajectory) -> str:
    """A successful attempt's actions, one numbered step a line (1-based)."""
    steps = [f"Step {pos + 1}: {_action_text(t)}" for pos, t in enumerate(tr.turns)]
    return "\n".join(["A successful attempt at the same task took these actions:"] + steps)


@register_feedback_source("successful_sibling")
def successful_sibling_feedback(group: list[Trajectory]) -> dict[Key, str]:
    """For each unsuccessful trajectory, the first successful other rollout of the group (same text per turn).

    The successful trajectory itself gets nothing: re-prompting a success with itself teaches nothing
    (SDPO/SERL ``dont_reprompt_on_self_success``).
    """
    winners = [i for i, tr in _live(group) if tr.success]
    if not winners:
        return {}
    text = render_actions(group[winners[0]])
    out = {}
    for i, tr in _live(group):
        if tr.success:
            continue
        for t in tr.turns:
            if is_action_turn(t):
                out[(i, t.turn)] = text
    return out


@register_feedback_source("analyzer")
def analyzer_feedback(group: list[Trajectory]) -> dict[Key, str]:
    """HINT-SD: the analyzer's correction at each step it picked (recorded by the agent loop as ``hs_analysis``)."""
    out = {}
    for i, tr in _live(group):
        action_turns = {t.turn for t in tr.turns if is_action_turn(t)}
        for turn, text in (tr.extra.get("hs_analysis") or {}).get("steps") or ():
            if int(turn) in action_turns and str(text).strip():
                out[(i, int(turn))] = str(text).strip()
    return out


def render_diagnosis(d: dict) -> str:
    parts = [f"This step was {'necessary' if d.get('necessary') else 'unnecessary'} and "
             f"{'valid' if d.get('valid') else 'invalid'}.", str(d.get("diagnosis", "")).strip()]
    if d.get("corrected_action"):
        parts.append(f"A better action: {d['corrected_action']}")
    return " ".join(p for p in parts if p)


@register_feedback_source("reflection")
def reflection_feedback(group: list[Trajectory]) -> dict[Key, str]:
    """HERO: the reflector's turn-level diagnosis (``hs_reflection``), on diagnosed action turns only."""
    out = {}
    for i, tr in _live(group):
        action_turns = {t.turn for t in tr.turns if is_action_turn(t)}
        for d in (tr.extra.get("hs_reflection") or {}).get("turns") or ():
            if int(d.get("turn", -1)) in action_turns and str(d.get("diagnosis", "")).strip():
                out[(i, int(d["turn"]))] = render_diagnosis(d)
    return out


@register_feedback_source("judge")
def judge_feedback(group: list[Trajectory]) -> dict[Key, str]:
    """SERL's LLM judge: the episode summary (``hs_judge``, written by the agent loop) on every action turn of it."""
    out = {}
    for i, tr in _live(group):
        summary = str((tr.extra.get("hs_judge") or {}).get("summary") or "").strip()
        if summary:
            out.update({(i, t.turn): summary for t in tr.turns if is_action_turn(t)})
    return out


# ---------------------------------------------------------------------------------------------------------------
# Placement
# ---------------------------------------------------------------------------------------------------------------


def anchor_pools(group: list[Trajectory], similarity: Optional[float] = None) -> list[list[Key]]:
    """Action turns of the live trajectories pooled by anchor, in (trajectory, turn) order.

    Exact match by default; with ``similarity`` a turn joins the first pool whose first anchor has a difflib
    ratio >= similarity (greedy, so the result depends only on the input order).
    """
    pools: list[tuple[str, list[Key]]] = []
    for i, tr in _live(group):
        for t in tr.turns:
            if not is_action_turn(t):
                continue
            for anchor, members in pools:
                if anchor == t.anchor or (
                        similarity is not None
                        and difflib.SequenceMatcher(None, anchor, t.anchor).ratio() >= similarity):
                    members.append((i, t.turn))
                    break
            else:
                pools.append((t.anchor, [(i, t.turn)]))
    return [members for _, members in pools]


def anchor_level(group: list[Trajectory], feedback: dict[Key, str],
                 similarity: Optional[float] = None) -> dict[Key, str]:
    """Each pooled turn gets every distinct action tried at its anchor with that action's feedback.

    Lines are "action <a> -> <feedback>" in (trajectory, turn) order, one per distinct action (its first
    occurrence with feedback); actions without feedback are left out, and so are pools with none.
    """
    turns = {(i, t.turn): t for i, tr in enumerate(group) for t in tr.turns}
    out = {}
    for members in anchor_pools(group, similarity):
        seen, lines = set(), []
        for key in members:
            action = _action_text(turns[key])
            if action in seen or not feedback.get(key):
                continue
            seen.add(action)
            lines.append(f"action {action} -> {feedback[key]}")
        if lines:
            text = "\n".join(lines)
            out.update({key: text for key in members})
    return out


def turn_level(group: list[Trajectory], feedback: dict[Key, str], similarity: Optional[float] = None):
    return dict(feedback)


# ---------------------------------------------------------------------------------------------------------------
# Batch entry point
# ---------------------------------------------------------------------------------------------------------------


def compute_feedback(trajectories: list[Trajectory], config: FeedbackConfig) -> tuple[dict[Key, str], dict[str, float]]:
    """Feedback per (index in ``trajectories``, turn) for the whole batch, plus ``hindsight/*`` metrics.

    Sources see one GRPO group at a time (siblings and anchors only make sense within a task).
    ``hindsight/feedback_coverage`` is over all action turns of the batch, env-failed trajectories included,
    so it shows how much of the batch hindsight can reach.
    """
    source = get_feedback_source(config.source)
    place = anchor_level if config.placement == "anchor" else turn_level
    feedback: dict[Key, str] = {}
    for indices in group_by_uid(trajectories).values():
        group = [trajectories[i] for i in indices]
        placed = place(group, source(group), config.similarity)
        for (local, turn), text in placed.items():
            if text and not group[local].failure:  # guard for third-party sources
                feedback[(indices[local], turn)] = clip_start(text, config.max_chars)

    action_turns = [(i, t.turn) for i, tr in enumerate(trajectories) for t in tr.turns if is_action_turn(t)]
    covered = sum(1 for key in action_turns if key in feedback)
    metrics = {
        "hindsight/feedback_coverage": covered / len(action_turns) if action_turns else 0.0,
        "hindsight/feedback_turns": float(len(feedback)),
        "hindsight/feedback_mean_chars": (sum(map(len, feedback.values())) / len(feedback)) if feedback else 0.0,
    }
    return feedback, metrics
