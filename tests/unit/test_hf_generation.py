"""The ``hf`` backend's compute core against direct transformers computations."""

import pytest
import torch

from verl_hindsight.rollout.hf_generation import BatchedGenerator, RequestRejected, build_request

PROMPTS = ["hello there door", "a", "the red key opens the blue door quickly now", "123 + 45 =", "<action>go"]


@pytest.fixture(scope="module")
def setup(tiny_model_and_tokenizer):
    model, tok = tiny_model_and_tokenizer
    gen = BatchedGenerator(model, pad_token_id=tok.pad_token_id, tokenizer=tok)
    return model, tok, gen


def req(tok, prompt_ids, max_model_len=2048, **params):
    params.setdefault("max_tokens", 12)
    return build_request(prompt_ids, params, max_model_len=max_model_len, response_length=12, prompt_length=64,
                         eos_token_ids=frozenset([tok.eos_token_id]), vocab_size=len(tok))


def direct_greedy(model, ids, n):
    """Reference: plain greedy decoding by full forwards, no cache, no padding."""
    ids = list(ids)
    out, lps = [], []
    for _ in range(n):
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ids])).logits[0, -1].float()
        tok = int(logits.argmax())
        lps.append(float(logits.log_softmax(-1)[tok]))
        out.append(tok)
        ids.append(tok)
    return out, lps


def test_batched_greedy_equals_one_by_one_and_direct(setup):
    model, tok, gen = setup
    prompts = [tok.encode(p) for p in PROMPTS]
    batched = gen.run([req(tok, p, temperature=0, logprobs=True) for p in prompts])
    for p, b in zip(prompts, batched):
        single = gen.run([req(tok, p, temperature=0, logprobs=True)])[0]
        assert b.token_ids == single.token_ids
        ref_ids, ref_lps = direct_greedy(model, p, len(b.token_ids))
        assert b.token_ids == ref_ids
        assert b.log_probs == pytest.approx(ref_lps, abs=1e-4)


def test_prompt_scoring_equals_direct_forward(setup):
    model, tok, gen = setup
    seqs = [tok.encode(p) for p in PROMPTS if len(tok.encode(p)) > 1]
    results = gen.run([req(tok, s, max_tokens=1, prompt_logprobs=0) for s in seqs])  # one padded wave
    for s, r in zip(seqs, results):
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([s])).logits[0].float()
        ref = logits[:-1].log_softmax(-1).gather(-1, torch.tensor(s[1:]).unsqueeze(-1)).squeeze(-1)
        got = torch.tensor([row[0] for row in r.prompt_logprobs[:-1]])
        assert len(r.prompt_logprobs) == len(s)  # one row per position, dummy last row (vLLM/verl contract)
        assert torch.allclose(got, ref, atol=1e-5)
        assert [row[0] for row in r.prompt_ids_topk[:-1]] == s[1:]


def test_prompt_topk_logprobs(setup):
    model, tok, gen = setup
    s = tok.encode(PROMPTS[2])
    r = gen.run([req(tok, s, max_tokens=1, prompt_logprobs=3)])[0]
    with torch.no_grad():
        lp = model(input_ids=torch.tensor([s])).logits[0, :-1].float().log_softmax(-1)
    top = lp.topk(3, dim=-1)
    assert r.prompt_ids_topk[:-1] == top.indices.tolist()
    assert torch.allclose(torch.tensor(r.prompt_logprobs[:-1]), top.values, atol=1e-5)
    assert r.prompt_ids_topk[-1] == [0, 0, 0]


def test_max_tokens_and_default_budget(setup):
    _, tok, gen = setup
    p = tok.encode(PROMPTS[0])
    assert len(gen.run([req(tok, p, max_tokens=5, ignore_eos=True)])[0].token_ids) == 5
    # no max_tokens: verl's vLLM default min(response_length, prompt_length + response_length - len(prompt))
    r = build_request(p, {"ignore_eos": True}, max_model_len=2048, response_length=12, prompt_length=64,
                      eos_token_ids=frozenset(), vocab_size=len(tok))
    assert r.max_tokens == 12
    # clamped to the room left in the context window
    r = build_request(p, {"max_tokens": 100}, max_model_len=len(p) + 3, response_length=12, prompt_length=64,
                      eos_token_ids=frozenset(), vocab_size=len(tok))
    assert r.max_tokens == 3


def test_stop_token_ids_end_generation_and_are_kept(setup):
    _, tok, gen = setup
    p = tok.encode(PROMPTS[2])
    free = gen.run([req(tok, p, temperature=0, ignore_eos=True)])[0].token_ids
    stop_at = free[3]
    first = free.index(stop_at)
    r = gen.run([req(tok, p, temperature=0, ignore_eos=True, stop_token_ids=[stop_at])])[0]
    assert r.token_ids == free[: first + 1] and r.finish_reason == "stop"


def test_stop_strings(setup):
    _, tok, gen = setup
    p = tok.encode(PROMPTS[2])
    free = gen.run([req(tok, p, temperature=0, ignore_eos=True)])[0].token_ids
    text = tok.decode(free[2:4])
    r = gen.run([req(tok, p, temperature=0, ignore_eos=True, stop=[text])])[0]
    assert r.finish_reason == "stop" and len(r.token_ids) <= 4 and text in tok.decode(r.token_ids)


def test_top_k_one_is_greedy_and_seed_is_reproducible(setup):
    _, tok, gen = setup
    p = tok.encode(PROMPTS[3])
    greedy = gen.run([req(tok, p, temperature=0, ignore_eos=True)])[0].token_ids
    assert gen.run([req(tok, p, temperature=1.0, top_k=1, ignore_eos=True)])[0].token_ids == greedy
    a = gen.run([req(tok, p, temperature=1.0, seed=7, ignore_eos=True)])[0].token_ids
    b = gen.run([req(tok, p, temperature=1.0, seed=7, ignore_eos=True)])[0].token_ids
    c = gen.run([req(tok, p, temperature=1.0, seed=8, ignore_eos=True)])[0].token_ids
    assert a == b and a != c


def test_processed_logprobs_match_temperature_topk_topp_distribution(setup):
    model, tok, gen = setup
    p = tok.encode(PROMPTS[1])
    temperature, top_k, top_p = 0.7, 20, 0.8
    r = gen.run([req(tok, p, temperature=temperature, top_k=top_k, top_p=top_p, logprobs=True, max_tokens=1,
                     seed=1)])[0]
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([p])).logits[0, -1].float() / temperature
    # independent reference: keep the top-k, then the smallest prefix whose mass reaches top_p
    probs = logits.softmax(-1)
    order = probs.argsort(descending=True)[:top_k]
    kept_probs = logits[order].softmax(-1)
    n_keep = int((kept_probs.cumsum(0) < top_p).sum()) + 1
    kept = order[:n_keep]
    ref = logits[kept].log_softmax(-1)
    tok_id = r.token_ids[0]
    assert tok_id in kept.tolist()
    assert r.log_probs[0] == pytest.approx(float(ref[kept.tolist().index(tok_id)]), abs=1e-5)


def test_over_length_prompt_rejected_with_clear_message(setup):
    _, tok, _ = setup
    with pytest.raises(RequestRejected, match=r"prompt length \(10\).*maximum context length \(10\).*max_model_len"):
        req(tok, list(range(10)), max_model_len=10)


@pytest.mark.parametrize("params, match", [
    ({"temperature": -1}, "temperature"),
    ({"top_p": 0}, "top_p"),
    ({"best_of": 2}, "unsupported sampling_params"),
    ({"n": 2}, "n must be 1"),
])
def test_bad_sampling_params_rejected(setup, params, match):
    _, tok, _ = setup
    with pytest.raises(RequestRejected, match=match):
        req(tok, [1, 2, 3], **params)


def test_out_of_vocab_and_empty_prompts_rejected(setup):
    _, tok, _ = setup
    with pytest.raises(RequestRejected, match="outside the vocabulary"):
        req(tok, [1, len(tok) + 5])
    with pytest.raises(RequestRejected, match="empty prompt"):
        req(tok, [])
