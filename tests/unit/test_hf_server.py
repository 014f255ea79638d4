"""The ``hf`` rollout server as a Ray actor, and the worker-side adapter that pushes weights to it."""

import asyncio

import pytest
import ray
import torch

from verl_hindsight.rollout.hf_replica import HFServerAdapter, server_actor_name
from verl_hindsight.rollout.hf_server import HFRolloutServer


def rollout_config(**overrides):
    from verl.workers.config import RolloutConfig

    kw = dict(name="hf", prompt_length=64, response_length=16, dtype="float32", tensor_model_parallel_size=1)
    kw.update(overrides)
    return RolloutConfig(**kw)


@pytest.fixture(scope="module")
def ray_cluster():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, ignore_reinit_error=True)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def server(ray_cluster, tiny_model_dir):
    cfg = rollout_config(max_model_len=48)
    actor = ray.remote(HFRolloutServer).options(name=server_actor_name(0), max_concurrency=64).remote(
        config=cfg, model_config={"path": str(tiny_model_dir)}, replica_rank=0)
    ray.get(actor.get_stats.remote())
    yield actor
    ray.kill(actor)


GREEDY = {"temperature": 0, "top_p": 1.0, "top_k": -1, "logprobs": True, "max_tokens": 8}


def test_concurrent_requests_are_batched_and_match_one_by_one(server, tiny_model_and_tokenizer):
    _, tok = tiny_model_and_tokenizer
    prompts = [tok.encode(f"door {i} is red and the key") for i in range(16)]
    before = ray.get(server.get_stats.remote())
    outs = ray.get([server.generate.remote(p, dict(GREEDY), f"r{i}") for i, p in enumerate(prompts)])
    after = ray.get(server.get_stats.remote())
    assert after["max_wave"] > 1, "concurrent requests were served one at a time"
    assert after["waves"] - before["waves"] < 16
    for i, p in enumerate(prompts):
        single = ray.get(server.generate.remote(p, dict(GREEDY), f"s{i}"))
        assert single.token_ids == outs[i].token_ids
        assert outs[i].stop_reason == "completed" and len(outs[i].log_probs) == len(outs[i].token_ids)


def test_over_length_request_is_rejected_and_server_keeps_serving(server, tiny_model_and_tokenizer):
    _, tok = tiny_model_and_tokenizer
    with pytest.raises(ray.exceptions.RayTaskError, match=r"prompt length \(60\).*max_model_len"):
        ray.get(server.generate.remote(list(range(3, 63)), dict(GREEDY), "long"))
    ok = ray.get(server.generate.remote(tok.encode("still alive"), dict(GREEDY), "after"))
    assert len(ok.token_ids) >= 1


def test_prompt_logprob_scoring_contract(server, tiny_model_and_tokenizer):
    model, tok = tiny_model_and_tokenizer
    seq = tok.encode("the red key opens the blue door")
    out = ray.get(server.generate.remote(seq, {"max_tokens": 1, "temperature": 1.0, "prompt_logprobs": 0}, "score"))
    with torch.no_grad():
        lp = model(input_ids=torch.tensor([seq])).logits[0, :-1].float().log_softmax(-1)
    ref = lp.gather(-1, torch.tensor(seq[1:]).unsqueeze(-1)).squeeze(-1)
    got = torch.tensor([row[0] for row in out.extra_fields["prompt_logprobs"][:-1]])
    assert torch.allclose(got, ref, atol=1e-5)
    assert out.extra_fields["prompt_ids"][:-1] == [[t] for t in seq[1:]]


def _perturbed_state(model, scale=0.05):
    g = torch.Generator().manual_seed(0)
    return {k: v + scale * torch.randn(v.shape, generator=g) for k, v in model.state_dict().items()}


def test_adapter_pushes_weights_and_server_scores_with_them(server, tiny_model_dir, tiny_model_and_tokenizer,
                                                            monkeypatch):
    from transformers import AutoModelForCausalLM
    from verl.workers.config import HFModelConfig

    model, tok = tiny_model_and_tokenizer
    new_state = _perturbed_state(model)
    new_state.pop("lm_head.weight", None)  # tied to the embeddings, as verl's FSDP engine exports it
    reference = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32, attn_implementation="sdpa")
    reference.load_state_dict(new_state, strict=False)

    monkeypatch.setenv("RANK", "0")
    adapter = HFServerAdapter(config=rollout_config(), model_config=HFModelConfig(path=str(tiny_model_dir)),
                              device_mesh=None)
    asyncio.run(adapter.update_weights(iter(new_state.items()), global_steps=7))

    seq = tok.encode("the red key opens the blue door")
    out = ray.get(server.generate.remote(seq, {"max_tokens": 1, "prompt_logprobs": 0}, "after-sync"))
    with torch.no_grad():
        lp = reference(input_ids=torch.tensor([seq])).logits[0, :-1].float().log_softmax(-1)
    ref = lp.gather(-1, torch.tensor(seq[1:]).unsqueeze(-1)).squeeze(-1)
    got = torch.tensor([row[0] for row in out.extra_fields["prompt_logprobs"][:-1]])
    assert torch.allclose(got, ref, atol=1e-5)
    assert out.extra_fields["global_steps"] == 7


def test_incomplete_weight_update_is_refused(server, tiny_model_and_tokenizer):
    model, _ = tiny_model_and_tokenizer
    partial = list(model.state_dict().items())[:3]
    ray.get(server.load_weights.remote(partial))
    with pytest.raises(ray.exceptions.RayTaskError, match="missing parameters"):
        ray.get(server.finish_weight_update.remote(1))
    ray.get(server.load_weights.remote([("not.a.param", torch.zeros(1))]))
    with pytest.raises(ray.exceptions.RayTaskError, match="does not know"):
        ray.get(server.finish_weight_update.remote(1))
