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

With ``insert_feedback=False`` (``hindsight.teacher.insert_feedback``, the no-feedback control) the generation
prompt is put back where the feedback would go, so every teacher sequence is the student's own context up to the
target's action, scored at the student's own positions (``shift`` = 0).

Positions are full-sequence positions (prompt + response). For a student token at position ``i`` in a target
turn, the teacher scores the same token at ``i + shift``, where ``shift`` adds ``len(F) - len(G)`` for every
insertion at or before that turn. Teacher log-probs are produced by a *scorer*: a callable mapping token
sequences (1-D int64 tensors) to ``log p(x_j | x_<j)`` for j >= 1 — a plain transformers forward (CPU tests), the
rollout server's prompt-log-prob scoring (vLLM, SGLang and the plugin's ``hf`` backend share that contract), or
the actor/ref log-prob pass in the trainer.

Mapped back, the teacher's answer for a student row is written in verl's distillation layout (the layout verl's
teacher loop writes and its distillation losses read): ``teacher_logprobs`` and ``teacher_ids``, each
(prompt_len + response_len, K), where row ``p`` describes the next token after position ``p`` (the token at
``p + 1``): with a sampled-token scorer K = 1 and the row holds the student's own token and the teacher's
log-prob of it; with a top-k scorer the teacher's K most likely tokens and their log-probs. verl's
``no_padding_2_padding`` turns either into response-aligned (bs, response_len, K).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence, Union

import torch

from verl_hindsight.config import DEFAULT_FEEDBACK_TEMPLATE


Scorer = Callable[[list[torch.Tensor]], list[torch.Tensor]]


@dataclass
class TopKScores:
    """A top-k scorer's answer for one sequence of n tokens (positions j = 1..n-1, like a scorer's)."""

    log_probs: torch.Tensor  # (n-1,) fp32: log p(x_j | x_<j)
    topk_ids: torch.Tensor  # (n-1, k) int64: the k most likely tokens at each position
    topk_log_probs: torch.Tensor  # (n-1, k) fp32: their log-probs


TopKScorer = Callable[[list[torch.Tensor]], list[TopKScores]]


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
    token_ids: torch.Tensor  # (n,) int64
    # (m, 2) int64: (student response position, teacher sequence position) of every scored token
    positions: torch.Tensor
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


def _ids(values) -> torch.Tensor:
    return torch.as_tensor(values, dtype=torch.long)


def plan_teacher_sequences(
    prompt_ids: Union[torch.Tensor, Sequence[int]],
    response_ids: Union[torch.Tensor, Sequence[int]],
    targets: list[TargetTurn],
    renderer: FeedbackRenderer,
    *,
    mode: str = "isolated",
    max_length: Optional[int] = None,
    overflow: str = "truncate_left",
    insert_feedback: bool = True,
) -> SplicePlan:
    """Build the teacher sequences of one trajectory (see module docstring)."""
    if mode not in ("isolated", "cumulative"):
        raise ValueError(f"hindsight.teacher.mode must be 'isolated' or 'cumulative', got {mode!r}")
    if overflow not in ("truncate_left", "skip"):
        raise ValueError(f"hindsight.teacher.overflow must be 'truncate_left' or 'skip', got {overflow!r}")
    response_length = len(response_ids)
    full = torch.cat([_ids(prompt_ids), _ids(response_ids)])
    p0 = len(prompt_ids)
    gen = _ids(renderer.generation_prompt)
    plan = SplicePlan()
    valid: list[TargetTurn] = []
    for t in sorted(targets, key=lambda x: x.message_start):
        start = p0 + t.message_start
        if start < len(gen) or not torch.equal(full[start - len(gen):start], gen):
            plan.skipped.append((t.turn, "no_generation_prompt"))
            continue
        if not (t.message_start <= t.action_start < t.action_end <= response_length):
            plan.skipped.append((t.turn, "bad_span"))
            continue
        valid.append(t)

    groups = [[t] for t in valid] if mode == "isolated" else ([valid] if valid else [])
    for group in groups:
        pieces: list[torch.Tensor] = []
        positions: list[torch.Tensor] = []
        length = cursor = 0
        for t in group:
            start = p0 + t.message_start
            inserted = _ids(renderer.feedback_ids(t.feedback)) if insert_feedback else gen
            pieces += [full[cursor:start - len(gen)], inserted]
            length += len(pieces[-2]) + len(pieces[-1])
            student = torch.arange(t.action_start, t.action_end)
            positions.append(torch.stack([student, student + p0 + (length - start)], dim=1))
            cursor = start
        pieces.append(full[cursor:p0 + group[-1].action_end])
        seq, scored = torch.cat(pieces), torch.cat(positions)
        turns = [t.turn for t in group]
        if max_length is not None and len(seq) > max_length:
            excess = len(seq) - max_length
            first_needed = int(scored[:, 1].min()) - 1  # the token before the first scored one
            if overflow == "skip" or excess > first_needed:
                plan.skipped += [(turn, "too_long") for turn in turns]
                continue
            plan.sequences.append(TeacherSequence(seq[excess:], scored - torch.tensor([0, excess]), turns, excess))
        else:
            plan.sequences.append(TeacherSequence(seq, scored, turns))
    return plan


@dataclass
class MappedRow:
    """One student row's teacher answer: ``teacher_logprobs``/``teacher_ids`` in verl's layout (module doc), the
    targeted-token mask and the teacher's log-prob of each sampled response token (response-aligned)."""

    teacher_logprobs: torch.Tensor  # (prompt_len + response_len, K) fp32
    teacher_ids: torch.Tensor  # (prompt_len + response_len, K) int64
    hindsight_mask: torch.Tensor  # (response_len,) int64, 1 on targeted tokens
    sampled_log_probs: torch.Tensor  # (response_len,) fp32, 0 where not targeted


def empty_row(prompt_length: int, response_length: int, k: int = 1) -> MappedRow:
    """A row the teacher does not score: zeros everywhere (the losses and SERL skip it through the mask)."""
    n = prompt_length + response_length
    return MappedRow(torch.zeros((n, k)), torch.zeros((n, k), dtype=torch.long),
                     torch.zeros(response_length, dtype=torch.long), torch.zeros(response_length))


def sampled_log_probs(teacher_ids: torch.Tensor, teacher_logprobs: torch.Tensor, prompt_length: int,
                      response_ids) -> torch.Tensor:
    """The teacher's log-prob of each response token, read back from verl's layout: (response_len,), NaN where
    the token is not among the row's K ids (only possible with a top-k teacher)."""
    response_ids = _ids(response_ids)
    before = torch.arange(len(response_ids)) + prompt_length - 1
    ids, lps = teacher_ids[before].long(), teacher_logprobs[before].float()
    hit = ids.eq(response_ids.unsqueeze(-1))
    found = (lps * hit).sum(-1)
    return torch.where(hit.any(-1), found, torch.full_like(found, float("nan")))


def map_back(plan: SplicePlan, scores: list, prompt_ids, response_ids,
             scored_mask: Optional[torch.Tensor] = None, k: int = 1) -> MappedRow:
    """The teacher's scores of a row's plan, mapped onto the student's tokens.

    ``scores[s]`` answers ``plan.sequences[s]``: a (n-1,) tensor from a scorer (``k`` = 1) or a
    :class:`TopKScores` from a top-k scorer (``k`` its width). Only positions where ``scored_mask`` (response-
    aligned; the action mask or the response mask) is 1 are mapped and targeted.
    """
    p0, response_length = len(prompt_ids), len(response_ids)
    row = empty_row(p0, response_length, k)
    response_ids = _ids(response_ids)
    for seq, scored in zip(plan.sequences, scores):
        sampled = scored.log_probs if isinstance(scored, TopKScores) else scored
        if len(sampled) != len(seq.token_ids) - 1:
            raise ValueError(f"scorer returned {len(sampled)} log-probs for a sequence of {len(seq.token_ids)} "
                             "tokens")
        if isinstance(scored, TopKScores) and tuple(scored.topk_ids.shape) != (len(seq.token_ids) - 1, k):
            raise ValueError(f"top-k scorer returned {tuple(scored.topk_ids.shape)} for a sequence of "
                             f"{len(seq.token_ids)} tokens with k={k}")
        student, teacher = seq.positions[:, 0], seq.positions[:, 1]
        keep = student < response_length
        student, teacher = student[keep], teacher[keep]
        if scored_mask is not None:
            keep = torch.as_tensor(scored_mask)[student].bool()
            student, teacher = student[keep], teacher[keep]
        before = p0 + student - 1  # verl's layout: the row before a token describes it
        row.hindsight_mask[student] = 1
        row.sampled_log_probs[student] = sampled[teacher - 1].float().cpu()
        if isinstance(scored, TopKScores):
            row.teacher_ids[before] = scored.topk_ids[teacher - 1].long().cpu()
            row.teacher_logprobs[before] = scored.topk_log_probs[teacher - 1].float().cpu()
        else:
            row.teacher_ids[before, 0] = response_ids[student]
            row.teacher_logprobs[before, 0] = row.sampled_log_probs[student]
    return row


def _forward_log_softmax(model, seq: torch.Tensor) -> torch.Tensor:
    ids = _ids(seq).unsqueeze(0).to(next(model.parameters()).device)
    return model(input_ids=ids).logits[0, :-1].float().log_softmax(-1)


def _sampled(logp: torch.Tensor, seq: torch.Tensor) -> torch.Tensor:
    return logp.gather(-1, _ids(seq)[1:].to(logp.device).unsqueeze(-1)).squeeze(-1).cpu()


def transformers_topk_scorer(model, k: int) -> TopKScorer:
    """Top-k scores with a plain transformers forward (the reference the worker pass is tested against)."""

    @torch.no_grad()
    def score(sequences: list[torch.Tensor]) -> list[TopKScores]:
        out = []
        for seq in sequences:
            logp = _forward_log_softmax(model, seq)
            top_lp, top_ids = logp.topk(k, dim=-1)
            out.append(TopKScores(_sampled(logp, seq), top_ids.cpu(), top_lp.cpu()))
        return out

    return score


def transformers_scorer(model) -> Scorer:
    """Score sequences with a plain transformers forward (one at a time; CPU tests and small runs)."""

    @torch.no_grad()
    def score(sequences: list[torch.Tensor]) -> list[torch.Tensor]:
        return [_sampled(_forward_log_softmax(model, seq), seq) for seq in sequences]

    return score


async def score_with_rollout_server(generate, sequences: list, request_prefix: str = "teacher") -> list[torch.Tensor]:
    """Score through any verl rollout server's prompt-log-prob contract (vLLM, SGLang, hf).

    ``generate`` is ``server_manager.generate``; the server returns ``extra_fields["prompt_logprobs"]`` with one row
    per position j (log-prob of token j + 1) and a dummy last row.
    """
    import asyncio

    async def one(k: int, seq) -> torch.Tensor:
        seq = _ids(seq).tolist()  # the servers take token ids as a list
        out = await generate(request_id=f"{request_prefix}-{k}", prompt_ids=seq,
                             sampling_params={"max_tokens": 1, "temperature": 1.0, "prompt_logprobs": 0})
        rows = out.extra_fields.get("prompt_logprobs")
        if rows is None or len(rows) != len(seq):
            raise ValueError("rollout server did not return prompt log-probs for every position; it must support "
                             "sampling_params.prompt_logprobs (vLLM, SGLang, hf)")
        return torch.tensor([float(r[0]) for r in rows[:-1]])

    return list(await asyncio.gather(*(one(k, s) for k, s in enumerate(sequences))))


def forwarded_tokens(plan: SplicePlan) -> int:
    return sum(len(s.token_ids) for s in plan.sequences)
