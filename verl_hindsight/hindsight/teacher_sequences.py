"""Teacher sequences by token splicing, and the teacher's log-probs mapped back onto the student's tokens.

The self-teacher is the policy conditioned on hindsight feedback. Its context is built from the student's own
token ids (never by re-rendering the student's text, which could re-tokenize differently): at a target turn,
the generation prompt that opened the assistant message (``<|im_start|>assistant\\n`` for ChatML) is replaced by
the feedback rendered as a user message by the chat template *including* a fresh generation prompt::

    student: ... <obs><|im_end|>\\n  <|im_start|>assistant\\n  <action tokens> ...
    teacher: ... <obs><|im_end|>\\n  <|im_start|>user\\nConsider the following feedback ...<|im_end|>\\n
                                    <|im_start|>assistant\\n  <action tokens>

Two modes:
- ``isolated`` (released SERL/HINT-SD behaviour): one sequence per target turn, holding only that turn's
  feedback, and ending at that turn's last action token (nothing after the target is forwarded);
- ``cumulative``: one sequence per trajectory with every target's feedback inserted before its turn, so the
  feedback stays in context for later turns; it ends at the last target's action.

Positions are full-sequence positions (prompt + response). For a student token at position ``i`` in a target
turn, the teacher scores the same token at ``i + shift``, where ``shift`` adds ``len(F) - len(G)`` for every
insertion at or before that turn. Teacher log-probs are produced by a *scorer*: a callable mapping token
sequences to ``log p(x_j | x_<j)`` for j >= 1 — a plain transformers forward (CPU tests), the rollout server's
prompt-log-prob scoring (vLLM, SGLang and the plugin's ``hf`` backend share that contract), or the actor/ref
log-prob pass in the trainer.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

from verl_hindsight.config import DEFAULT_FEEDBACK_TEMPLATE


Scorer = Callable[[list[list[int]]], list[list[float]]]


@dataclass
class TopKScores:
    """A top-k scorer's answer for one sequence of n tokens (positions j = 1..n-1, like a scorer's)."""

    log_probs: list[float]  # log p(x_j | x_<j)
    topk_ids: "object"  # (n-1, k) int64 tensor: the k most likely tokens at each position
    topk_log_probs: "object"  # (n-1, k) fp32 tensor: their log-probs


TopKScorer = Callable[[list[list[int]]], list[TopKScores]]


@dataclass(frozen=True)
class TargetTurn:
    """One turn to distil: where its assistant message and its action sit in the response, and its feedback."""

    turn: int
    message_start: int  # response position where the assistant message's tokens start
    action_start: int  # response positions [action_start, action_end) of the action tokens
    action_end: int
    feedback: str


@dataclass
class TeacherSequence:
    token_ids: list[int]
    # (student response position, teacher sequence position) for every targeted action token
    positions: list[tuple[int, int]]
    turns: list[int]
    truncated_left: int = 0


@dataclass
class SplicePlan:
    sequences: list[TeacherSequence] = field(default_factory=list)
    skipped: list[tuple[int, str]] = field(default_factory=list)  # (turn, reason)


class FeedbackRenderer:
    """Token ids of "feedback as a user message + generation prompt", and of the bare generation prompt."""

    def __init__(self, tokenizer, template: str = DEFAULT_FEEDBACK_TEMPLATE, hf_model_type: Optional[str] = None):
        from verl.utils.tokenizer.continuous_token_wiring import create_continuous_token_builder

        self.tokenizer = tokenizer
        self.template = template
        self.builder = create_continuous_token_builder(tokenizer, hf_model_type=hf_model_type)
        synthetic = [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}]
        self._synthetic = synthetic
        self.generation_prompt = self.builder.render_delta_token_id(synthetic, [], add_generation_prompt=True)
        if not self.generation_prompt:
            raise ValueError("the chat template adds no generation prompt; cannot splice feedback turns")

    def feedback_ids(self, feedback: str) -> list[int]:
        message = {"role": "user", "content": self.template.format(feedback=feedback)}
        ids = self.builder.render_delta_token_id(self._synthetic, [message], add_generation_prompt=True)
        if ids[-len(self.generation_prompt):] != self.generation_prompt:
            raise ValueError("feedback rendering does not end with the generation prompt")
        return ids


def plan_teacher_sequences(
    prompt_ids: Sequence[int],
    response_ids: Sequence[int],
    targets: list[TargetTurn],
    renderer: FeedbackRenderer,
    *,
    mode: str = "isolated",
    max_length: Optional[int] = None,
    overflow: str = "truncate_left",
) -> SplicePlan:
    """Build the teacher sequences of one trajectory (see module docstring)."""
    if mode not in ("isolated", "cumulative"):
        raise ValueError(f"hindsight.teacher.mode must be 'isolated' or 'cumulative', got {mode!r}")
    if overflow not in ("truncate_left", "skip"):
        raise ValueError(f"hindsight.teacher.overflow must be 'truncate_left' or 'skip', got {overflow!r}")
    full = list(prompt_ids) + list(response_ids)
    p0 = len(prompt_ids)
    gen = renderer.generation_prompt
    plan = SplicePlan()
    valid: list[TargetTurn] = []
    for t in sorted(targets, key=lambda x: x.message_start):
        start = p0 + t.message_start
        if start < len(gen) or full[start - len(gen):start] != gen:
            plan.skipped.append((t.turn, "no_generation_prompt"))
            continue
        if not (t.message_start <= t.action_start < t.action_end <= len(response_ids)):
            plan.skipped.append((t.turn, "bad_span"))
            continue
        valid.append(t)

    groups = [[t] for t in valid] if mode == "isolated" else ([valid] if valid else [])
    for group in groups:
        seq: list[int] = []
        positions: list[tuple[int, int]] = []
        cursor = 0
        for t in group:
            start = p0 + t.message_start
            seq += full[cursor:start - len(gen)]
            seq += renderer.feedback_ids(t.feedback)
            shift = len(seq) - start
            positions += [(i - p0, i + shift) for i in range(p0 + t.action_start, p0 + t.action_end)]
            cursor = start
        end = p0 + group[-1].action_end
        seq += full[cursor:end]
        plan_seq = TeacherSequence(seq, positions, [t.turn for t in group])
        if max_length is not None and len(seq) > max_length:
            excess = len(seq) - max_length
            first_needed = min(j for _, j in positions) - 1  # the token before the first scored one
            if overflow == "skip" or excess > first_needed:
                plan.skipped += [(t.turn, "too_long") for t in group]
                continue
            plan_seq = TeacherSequence(seq[excess:], [(i, j - excess) for i, j in positions], plan_seq.turns, excess)
        plan.sequences.append(plan_seq)
    return plan


def _scored_positions(plan: SplicePlan, scores: list, response_length: int,
                      action_mask: Optional[Sequence[int]]):
    """(sequence score, student response position i, teacher position j) for every token the plan maps back."""
    for seq, seq_scores in zip(plan.sequences, scores):
        for i, j in seq.positions:
            if i >= response_length or (action_mask is not None and not action_mask[i]):
                continue
            yield seq_scores, i, j


def map_back(plan: SplicePlan, scores: list[list[float]], response_length: int,
             action_mask: Optional[Sequence[int]] = None) -> tuple[list[float], list[int]]:
    """Per-response-token teacher log-probs and the hindsight mask (1 only on scored action tokens).

    ``scores[k][j - 1]`` is log p(token j | tokens < j) of sequence k.
    """
    for seq, seq_scores in zip(plan.sequences, scores):
        if len(seq_scores) != len(seq.token_ids) - 1:
            raise ValueError(f"scorer returned {len(seq_scores)} log-probs for a sequence of {len(seq.token_ids)} tokens")
    teacher = [0.0] * response_length
    mask = [0] * response_length
    for seq_scores, i, j in _scored_positions(plan, scores, response_length, action_mask):
        teacher[i] = float(seq_scores[j - 1])
        mask[i] = 1
    return teacher, mask


def empty_topk(response_length: int, k: int):
    """Top-k columns of a response without teacher: all-zero ids and log-probs (what the student hook skips)."""
    import torch

    return torch.zeros((response_length, k), dtype=torch.long), torch.zeros((response_length, k), dtype=torch.float32)


def map_back_topk(plan: SplicePlan, scores: list[TopKScores], response_length: int, k: int,
                  action_mask: Optional[Sequence[int]] = None):
    """Per-response-token teacher top-k (ids, log-probs), each (response_length, k); zeros where not targeted."""
    for seq, scored in zip(plan.sequences, scores):
        if tuple(scored.topk_ids.shape) != (len(seq.token_ids) - 1, k):
            raise ValueError(f"top-k scorer returned {tuple(scored.topk_ids.shape)} for a sequence of "
                             f"{len(seq.token_ids)} tokens with k={k}")
    ids, lps = empty_topk(response_length, k)
    for scored, i, j in _scored_positions(plan, scores, response_length, action_mask):
        ids[i] = scored.topk_ids[j - 1]
        lps[i] = scored.topk_log_probs[j - 1]
    return ids, lps


def transformers_topk_scorer(model, k: int) -> TopKScorer:
    """Top-k scores with a plain transformers forward (the reference the worker pass is tested against)."""
    import torch

    @torch.no_grad()
    def score(sequences: list[list[int]]) -> list[TopKScores]:
        out = []
        for seq in sequences:
            ids = torch.tensor([seq], device=next(model.parameters()).device)
            logp = model(input_ids=ids).logits[0, :-1].float().log_softmax(-1)
            top_lp, top_ids = logp.topk(k, dim=-1)
            out.append(TopKScores(logp.gather(-1, ids[0, 1:].unsqueeze(-1)).squeeze(-1).tolist(), top_ids.cpu(),
                                  top_lp.cpu()))
        return out

    return score


def transformers_scorer(model) -> Scorer:
    """Score sequences with a plain transformers forward (one at a time; CPU tests and small runs)."""
    import torch

    @torch.no_grad()
    def score(sequences: list[list[int]]) -> list[list[float]]:
        out = []
        for seq in sequences:
            ids = torch.tensor([seq], device=next(model.parameters()).device)
            logp = model(input_ids=ids).logits[0, :-1].float().log_softmax(-1)
            out.append(logp.gather(-1, ids[0, 1:].unsqueeze(-1)).squeeze(-1).tolist())
        return out

    return score


async def score_with_rollout_server(generate, sequences: list[list[int]], request_prefix: str = "teacher") -> list[list[float]]:
    """Score through any verl rollout server's prompt-log-prob contract (vLLM, SGLang, hf).

    ``generate`` is ``server_manager.generate``; the server returns ``extra_fields["prompt_logprobs"]`` with one row
    per position j (log-prob of token j + 1) and a dummy last row.
    """
    import asyncio

    async def one(k: int, seq: list[int]) -> list[float]:
        out = await generate(request_id=f"{request_prefix}-{k}", prompt_ids=seq,
                             sampling_params={"max_tokens": 1, "temperature": 1.0, "prompt_logprobs": 0})
        rows = out.extra_fields.get("prompt_logprobs")
        if rows is None or len(rows) != len(seq):
            raise ValueError("rollout server did not return prompt log-probs for every position; it must support "
                             "sampling_params.prompt_logprobs (vLLM, SGLang, hf)")
        return [float(r[0]) for r in rows[:-1]]

    return list(await asyncio.gather(*(one(k, s) for k, s in enumerate(sequences))))


def forwarded_tokens(plan: SplicePlan) -> int:
    return sum(len(s.token_ids) for s in plan.sequences)
