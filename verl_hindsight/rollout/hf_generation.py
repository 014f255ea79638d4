"""Batched token-in/token-out generation and prompt scoring with a plain transformers causal LM.

This is the compute core of the ``hf`` rollout backend, kept free of Ray and verl so it can be tested and
benchmarked directly. One call to :meth:`BatchedGenerator.run` serves a *wave* of requests together:
left-padded prefill with a shared KV cache, then a decode loop in which every request keeps its own
sampling parameters (temperature, top-k, top-p, max tokens, stop tokens/strings, seed). Rows that finish
leave the batch, so short answers do not pay for long ones.

Semantics follow verl's vLLM server so agent loops cannot tell the backends apart:
- ``max_tokens`` defaults to what verl's vLLM server computes from ``response_length``/``prompt_length``
  and is clamped to the room left in ``max_model_len``; a prompt with no room is rejected (ValueError);
- the stop token (EOS or a ``stop_token_ids`` entry) is included in the returned ids;
- ``logprobs`` are the sampled tokens' log-probs under the *processed* distribution (after temperature,
  top-k and top-p, as ``logprobs_mode="processed_logprobs"``), or under the raw distribution for
  ``raw_logprobs``; greedy requests report the raw log-softmax;
- ``prompt_logprobs=k`` returns, like verl's ``extract_prompt_logprobs``, one row per prompt position j
  holding the log-prob of token j+1 (k=0) or the top-k ids/log-probs at j+1 (k>0), plus a dummy last row.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

import torch

PROCESSED_LOGPROBS = "processed_logprobs"
RAW_LOGPROBS = "raw_logprobs"

# sampling_params keys the backend understands; anything else is rejected so typos do not silently no-op.
_SUPPORTED_SAMPLING_KEYS = {
    "temperature", "top_p", "top_k", "max_tokens", "max_new_tokens", "stop", "stop_token_ids", "ignore_eos",
    "logprobs", "prompt_logprobs", "repetition_penalty", "seed", "detokenize", "min_p", "skip_special_tokens",
    "spaces_between_special_tokens", "n", "include_stop_str_in_output",
}


class RequestRejected(ValueError):
    """A request that can never be served (too long, bad parameters). The server keeps running."""


@dataclasses.dataclass
class GenerationRequest:
    prompt_ids: list[int]
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    stop_token_ids: frozenset[int] = frozenset()
    stop: tuple[str, ...] = ()
    logprobs: bool = False
    prompt_logprobs: Optional[int] = None
    repetition_penalty: float = 1.0
    seed: Optional[int] = None

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0.0 or self.top_k == 1


@dataclasses.dataclass
class GenerationResult:
    token_ids: list[int]
    log_probs: Optional[list[float]]
    finish_reason: str  # "stop", "length" or "abort"
    prompt_ids_topk: Optional[list[list[int]]] = None
    prompt_logprobs: Optional[list[list[float]]] = None


def build_request(
    prompt_ids: list[int],
    sampling_params: dict[str, Any],
    *,
    max_model_len: int,
    response_length: int,
    prompt_length: int,
    eos_token_ids: frozenset[int],
    vocab_size: int,
) -> GenerationRequest:
    """Validate one request and resolve its parameters; raise :class:`RequestRejected` with the fix."""
    params = dict(sampling_params or {})
    unknown = set(params) - _SUPPORTED_SAMPLING_KEYS
    if unknown:
        raise RequestRejected(
            f"hf rollout: unsupported sampling_params {sorted(unknown)}; supported: {sorted(_SUPPORTED_SAMPLING_KEYS)}"
        )
    if params.get("n", 1) != 1:
        raise RequestRejected("hf rollout: sampling_params.n must be 1 (verl issues one request per sample)")
    prompt_ids = [int(t) for t in prompt_ids]
    if not prompt_ids:
        raise RequestRejected("hf rollout: empty prompt_ids")
    bad = [t for t in prompt_ids if t < 0 or t >= vocab_size]
    if bad:
        raise RequestRejected(f"hf rollout: prompt token ids {bad[:5]} are outside the vocabulary (size {vocab_size})")
    room = max_model_len - len(prompt_ids)
    if room < 1:
        raise RequestRejected(
            f"hf rollout: prompt length ({len(prompt_ids)}) leaves no room to generate within the model's maximum "
            f"context length ({max_model_len}). Shorten the prompt (data.max_prompt_length / agent history) or raise "
            f"actor_rollout_ref.rollout.max_model_len up to the model's max_position_embeddings."
        )
    if "max_tokens" in params:
        max_tokens = params["max_tokens"]
    elif "max_new_tokens" in params:
        max_tokens = params["max_new_tokens"]
    else:
        max_tokens = min(response_length, prompt_length + response_length - len(prompt_ids))
    max_tokens = max(1, min(int(max_tokens), room))

    temperature = float(params.get("temperature", 1.0))
    top_p = float(params.get("top_p", 1.0))
    top_k = int(params.get("top_k", -1) if params.get("top_k") is not None else -1)
    if temperature < 0 or not 0.0 < top_p <= 1.0:
        raise RequestRejected(f"hf rollout: need temperature >= 0 and 0 < top_p <= 1, got {temperature}, {top_p}")
    if params.get("min_p", 0.0):
        raise RequestRejected("hf rollout: min_p is not supported; leave it unset")

    stop_ids = set(int(t) for t in (params.get("stop_token_ids") or []))
    if not params.get("ignore_eos", False):
        stop_ids |= set(eos_token_ids)
    stop = params.get("stop") or ()
    stop = (stop,) if isinstance(stop, str) else tuple(stop)
    prompt_logprobs = params.get("prompt_logprobs")
    return GenerationRequest(
        prompt_ids=prompt_ids,
        max_tokens=max_tokens,
        temperature=temperature,
        top_p=top_p,
        top_k=top_k,
        stop_token_ids=frozenset(stop_ids),
        stop=stop,
        # verl passes a bool; vLLM-style callers pass 0 ("the sampled token's log-prob")
        logprobs=params.get("logprobs") is True or type(params.get("logprobs")) is int,
        prompt_logprobs=None if prompt_logprobs is None else int(prompt_logprobs),
        repetition_penalty=float(params.get("repetition_penalty", 1.0) or 1.0),
        seed=params.get("seed"),
    )


def _process_logits(logits: torch.Tensor, reqs: list[GenerationRequest]) -> torch.Tensor:
    """Temperature, top-k and top-p per row (vectorised). Greedy rows get temperature 1 (unused for sampling)."""
    device = logits.device
    temps = torch.tensor([r.temperature if not r.greedy else 1.0 for r in reqs], device=device, dtype=logits.dtype)
    logits = logits / temps.unsqueeze(-1)
    vocab = logits.size(-1)
    top_k = torch.tensor([r.top_k if 0 < r.top_k < vocab else vocab for r in reqs], device=device)
    top_p = torch.tensor([r.top_p for r in reqs], device=device, dtype=logits.dtype)
    if bool((top_k < vocab).any()) or bool((top_p < 1.0).any()):
        sorted_logits, sorted_idx = logits.sort(dim=-1, descending=True)
        ranks = torch.arange(vocab, device=device).unsqueeze(0)
        remove = ranks >= top_k.unsqueeze(-1)
        probs = sorted_logits.masked_fill(remove, float("-inf")).softmax(dim=-1)
        # drop a token once the mass of strictly better tokens already reaches top_p (always keeps the best)
        mass_before = probs.cumsum(dim=-1) - probs
        remove |= mass_before >= top_p.unsqueeze(-1)
        sorted_logits = sorted_logits.masked_fill(remove, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, sorted_idx, sorted_logits)
    return logits


def _apply_repetition_penalty(logits: torch.Tensor, reqs: list[GenerationRequest], seen: list[list[int]]):
    for i, r in enumerate(reqs):
        if r.repetition_penalty != 1.0 and seen[i]:
            idx = torch.tensor(sorted(set(seen[i])), device=logits.device)
            vals = logits[i, idx]
            logits[i, idx] = torch.where(vals > 0, vals / r.repetition_penalty, vals * r.repetition_penalty)
    return logits


class BatchedGenerator:
    """Serves waves of requests on one causal LM. Not thread-safe: one wave at a time per instance."""

    def __init__(self, model, *, pad_token_id: int, logprobs_mode: str = PROCESSED_LOGPROBS, tokenizer=None):
        if logprobs_mode not in (PROCESSED_LOGPROBS, RAW_LOGPROBS):
            raise ValueError(
                f"hf rollout: logprobs_mode={logprobs_mode!r} is not supported; use "
                f"{PROCESSED_LOGPROBS!r} or {RAW_LOGPROBS!r}"
            )
        self.model = model
        self.pad_token_id = pad_token_id
        self.logprobs_mode = logprobs_mode
        self.tokenizer = tokenizer  # only needed for stop strings
        self.abort_requested = False

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.inference_mode()
    def run(self, requests: list[GenerationRequest]) -> list[GenerationResult]:
        from transformers import DynamicCache

        if not requests:
            return []
        self.abort_requested = False
        device = self.device
        bsz = len(requests)
        lengths = [len(r.prompt_ids) for r in requests]
        width = max(lengths)
        input_ids = torch.full((bsz, width), self.pad_token_id, dtype=torch.long, device=device)
        attention_mask = torch.zeros((bsz, width), dtype=torch.long, device=device)
        for i, r in enumerate(requests):
            input_ids[i, width - lengths[i]:] = torch.tensor(r.prompt_ids, device=device)
            attention_mask[i, width - lengths[i]:] = 1
        position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)

        cache = DynamicCache()
        # logits of every prompt position only when prompt log-probs are asked for: with a 262k-token vocabulary
        # they are 1 GiB per 1k prompt tokens, where sampling needs the last position's alone
        keep = 0 if any(r.prompt_logprobs is not None for r in requests) else 1
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         past_key_values=cache, use_cache=True, logits_to_keep=keep)
        results: list[Optional[GenerationResult]] = [None] * bsz
        generated: list[list[int]] = [[] for _ in range(bsz)]
        token_logprobs: list[list[float]] = [[] for _ in range(bsz)]
        prompt_scores = self._prompt_logprobs(out.logits, requests, lengths, width)
        generators = [self._generator(r) for r in requests]

        active = list(range(bsz))  # original index of each row still in the batch
        next_logits = out.logits[:, -1, :].float()
        next_positions = position_ids[:, -1] + 1
        step = 0
        while active:
            reqs = [requests[i] for i in active]
            raw_logits = _apply_repetition_penalty(next_logits.clone(), reqs,
                                                   [requests[i].prompt_ids + generated[i] for i in active])
            raw_logprobs = raw_logits.log_softmax(-1)
            processed = _process_logits(raw_logits, reqs)
            processed_logprobs = processed.log_softmax(-1)
            chosen = []
            for row, i in enumerate(active):
                r = requests[i]
                if r.greedy:
                    tok = int(raw_logits[row].argmax())
                    lp = float(raw_logprobs[row, tok])
                else:
                    probs = processed_logprobs[row].exp()
                    tok = int(torch.multinomial(probs, 1, generator=generators[i]))
                    source = processed_logprobs if self.logprobs_mode == PROCESSED_LOGPROBS else raw_logprobs
                    lp = float(source[row, tok])
                chosen.append(tok)
                generated[i].append(tok)
                token_logprobs[i].append(lp)
            step += 1

            keep_rows = []
            for row, i in enumerate(active):
                r = requests[i]
                reason = None
                if chosen[row] in r.stop_token_ids or self._hit_stop_string(r, generated[i]):
                    reason = "stop"
                elif len(generated[i]) >= r.max_tokens:
                    reason = "length"
                elif self.abort_requested:
                    reason = "abort"
                if reason is None:
                    keep_rows.append(row)
                    continue
                ids_k, lps_k = prompt_scores[i]
                results[i] = GenerationResult(
                    token_ids=generated[i],
                    log_probs=token_logprobs[i] if r.logprobs else None,
                    finish_reason=reason,
                    prompt_ids_topk=ids_k,
                    prompt_logprobs=lps_k,
                )
            if not keep_rows:
                break
            if len(keep_rows) < len(active):
                keep = torch.tensor(keep_rows, device=device)
                cache.batch_select_indices(keep)
                attention_mask = attention_mask.index_select(0, keep)
                next_positions = next_positions.index_select(0, keep)
                chosen = [chosen[row] for row in keep_rows]
                active = [active[row] for row in keep_rows]
            step_ids = torch.tensor(chosen, device=device).unsqueeze(-1)
            attention_mask = torch.cat([attention_mask, attention_mask.new_ones((len(active), 1))], dim=-1)
            out = self.model(input_ids=step_ids, attention_mask=attention_mask,
                             position_ids=next_positions.unsqueeze(-1), past_key_values=cache, use_cache=True)
            next_logits = out.logits[:, -1, :].float()
            next_positions = next_positions + 1
        return results  # type: ignore[return-value]

    @torch.inference_mode()
    def score(self, sequences: list[list[int]]) -> list[list[float]]:
        """log p(x_{j+1} | x_<=j) for every position of each sequence (length len(seq) - 1). Unbatched helper."""
        scores = []
        for seq in sequences:
            ids = torch.tensor([seq], device=self.device)
            logits = self.model(input_ids=ids).logits[0, :-1].float()
            scores.append(logits.log_softmax(-1).gather(-1, ids[0, 1:].unsqueeze(-1)).squeeze(-1).tolist())
        return scores

    def _prompt_logprobs(self, logits, requests, lengths, width):
        scores: list[tuple[Optional[list], Optional[list]]] = []
        for i, r in enumerate(requests):
            if r.prompt_logprobs is None:
                scores.append((None, None))
                continue
            start = width - lengths[i]
            row_logprobs = logits[i, start:width - 1].float().log_softmax(-1)  # predicts tokens 1..L-1
            k = r.prompt_logprobs
            if k == 0:
                targets = torch.tensor(r.prompt_ids[1:], device=logits.device).unsqueeze(-1)
                lps = row_logprobs.gather(-1, targets)
                ids = targets.tolist()
                lps = lps.tolist()
                dummy_ids, dummy_lps = [0], [0.0]
            else:
                top = row_logprobs.topk(k, dim=-1)
                ids, lps = top.indices.tolist(), top.values.tolist()
                dummy_ids, dummy_lps = [0] * k, [0.0] * k
            scores.append((ids + [dummy_ids], lps + [dummy_lps]))
        return scores

    def _generator(self, r: GenerationRequest) -> Optional[torch.Generator]:
        if r.greedy:
            return None
        g = torch.Generator(device=self.device)
        if r.seed is not None:
            g.manual_seed(int(r.seed))
        else:
            g.seed()
        return g

    def _hit_stop_string(self, r: GenerationRequest, generated: list[int]) -> bool:
        if not r.stop:
            return False
        if self.tokenizer is None:
            raise RequestRejected("hf rollout: stop strings need a tokenizer")
        # only the tail can complete a stop string that was not complete one token earlier
        longest = max(len(s) for s in r.stop)
        tail = self.tokenizer.decode(generated[-(longest + 8):], skip_special_tokens=False)
        return any(s in tail for s in r.stop)

