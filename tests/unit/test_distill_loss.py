"""Divergences against full-distribution computations, and the verl loss wrapper's masking and normalization."""

import pytest
import torch
from tensordict import TensorDict
from verl.utils import tensordict_utils as tu
from verl.workers.config import ActorConfig

from verl_hindsight.algo.divergences import jsd, k1, k3, topk_tail_reverse_kl
from verl_hindsight.algo.loss import DistillConfig, hindsight_ppo_loss

V = 7


def _dists(seed):
    gen = torch.Generator().manual_seed(seed)
    s = torch.log_softmax(torch.randn(5, V, generator=gen, dtype=torch.float64) * 2, -1)
    t = torch.log_softmax(torch.randn(5, V, generator=gen, dtype=torch.float64) * 2, -1)
    return s, t


def _expect_under_student(fn, s, t):
    """E_{x ~ S}[fn(s(x), t(x))] computed exactly by enumerating the vocabulary."""
    return (s.exp() * fn(s, t).double()).sum(-1)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_sampled_estimators_have_the_named_divergence_as_expectation(seed):
    s, t = _dists(seed)
    reverse_kl = (s.exp() * (s - t)).sum(-1)
    assert torch.allclose(_expect_under_student(k1, s, t), reverse_kl, atol=1e-5)
    assert torch.allclose(_expect_under_student(k3, s, t), reverse_kl, atol=1e-5)
    for beta in (0.5, 0.1, 0.9):
        m = torch.log(beta * s.exp() + (1 - beta) * t.exp())
        exact = beta * (s.exp() * (s - m)).sum(-1) + (1 - beta) * (t.exp() * (t - m)).sum(-1)
        got = _expect_under_student(lambda a, b: jsd(a, b, beta), s, t)
        assert torch.allclose(got, exact, atol=1e-5), beta


def test_topk_tail_reverse_kl_matches_the_bucketed_distributions():
    s, t = _dists(3)
    k = 3
    top = s.topk(k, dim=-1).indices
    s_top, t_top = s.gather(-1, top), t.gather(-1, top)
    s_buckets = torch.cat([s_top.exp(), 1 - s_top.exp().sum(-1, keepdim=True)], -1)
    t_buckets = torch.cat([t_top.exp(), 1 - t_top.exp().sum(-1, keepdim=True)], -1)
    exact = (s_buckets * (s_buckets.log() - t_buckets.log())).sum(-1)
    assert torch.allclose(topk_tail_reverse_kl(s_top, t_top).double(), exact, atol=1e-5)
    # k = vocabulary: the full reverse KL
    assert torch.allclose(topk_tail_reverse_kl(s, t).double(), (s.exp() * (s - t)).sum(-1), atol=1e-4)


def test_topk_tail_reverse_kl_gradient_equals_the_bucketed_reference():
    """d/d(student logits) of the (k+1)-bucket reverse KL, by autograd through an explicit float64 reference."""
    gen = torch.Generator().manual_seed(4)
    logits = torch.randn(5, V, generator=gen, dtype=torch.float64) * 2
    _, t = _dists(5)
    top = t.topk(3, dim=-1).indices  # the teacher's ids, as the student hook uses
    w = torch.rand(5, generator=gen, dtype=torch.float64)

    def grad(kl_fn):
        z = logits.clone().requires_grad_(True)
        s_top = torch.log_softmax(z, -1).gather(-1, top)
        t_top = t.gather(-1, top).requires_grad_(True)
        out = kl_fn(s_top, t_top)
        (w * out).sum().backward()
        return out.detach().double(), z.grad, t_top.grad

    def reference(s_top, t_top):
        s_b = torch.cat([s_top.exp(), 1 - s_top.exp().sum(-1, keepdim=True)], -1)
        t_b = torch.cat([t_top.detach().exp(), 1 - t_top.detach().exp().sum(-1, keepdim=True)], -1)
        return (s_b * (s_b.log() - t_b.log())).sum(-1)

    got, g, g_teacher = grad(topk_tail_reverse_kl)
    ref, r, _ = grad(reference)
    assert torch.allclose(got, ref, atol=1e-5)
    assert torch.allclose(g, r, atol=1e-5) and g.abs().sum() > 0  # fp32 inside vs float64 reference
    assert g_teacher is None


def _values_and_grads(fn, s, t, w):
    """fn's per-token values and d(sum w * fn)/d(s, t) by autograd on fresh leaves."""
    s, t = s.clone().requires_grad_(True), t.clone().requires_grad_(True)
    out = fn(s, t)
    (w * out).sum().backward()
    return out.detach(), s.grad, t.grad


@pytest.mark.parametrize("seed", [0, 1])
def test_k1_values_and_gradients_equal_the_hand_formula(seed):
    """k1 calls verl's kl_penalty(..., "k1"); checked against s - sg(t), not against verl."""
    gen = torch.Generator().manual_seed(seed)
    s, t = torch.randn(4, 9, generator=gen) * 3, torch.randn(4, 9, generator=gen) * 3
    w = torch.rand(4, 9, generator=gen)
    got, gs, gt = _values_and_grads(k1, s, t, w)
    ref, rs, _ = _values_and_grads(lambda a, b: a - b.detach(), s, t, w)
    assert torch.equal(got, ref) and torch.equal(gs, rs) and torch.equal(gs, w)
    assert gt is None  # the teacher is a fixed reference
    assert k1(s.bfloat16(), t.bfloat16()).dtype == torch.float32


def test_k3_is_not_clamped_where_verls_low_var_kl_is():
    """verl's low_var_kl clamps the estimate to [-10, 10]; k3 keeps the value and the gradient beyond it."""
    s = torch.tensor([-6.0, -1.0, -0.5])
    t = torch.tensor([-1.0, -16.0, -0.7])  # t - s = 5 (teacher ~150x), -15, -0.2
    w = torch.ones(3)
    got, gs, gt = _values_and_grads(k3, s, t, w)
    r = (t - s).double()
    assert torch.allclose(got.double(), r.exp() - r - 1, rtol=1e-6)  # 142.4, 14.0, 0.0187
    assert torch.allclose(gs.double(), 1 - r.exp(), rtol=1e-6)  # d/ds [e^(t-s) - (t-s) - 1]
    assert got[0] > 10 and got[1] > 10 and gt is None


def test_k3_in_bf16_inputs_is_computed_in_fp32_and_does_not_cancel():
    s = torch.tensor([-1.0000, -2.0], dtype=torch.bfloat16)
    t = s + torch.tensor([0.0078125, 0.015625], dtype=torch.bfloat16)  # small gaps
    # computed in bf16, exp(d) - d - 1 rounds to exactly 0 for such gaps
    d = (t - s)
    assert (torch.exp(d) - d - 1).abs().max().item() == 0.0
    out = k3(s, t)
    assert out.dtype == torch.float32 and (out > 0).all()


def test_teacher_gets_no_gradient():
    s = torch.randn(6, requires_grad=True)
    t = torch.randn(6, requires_grad=True)
    for fn in (k1, k3, lambda a, b: jsd(a, b, 0.3)):
        fn(s, t).sum().backward()
        assert t.grad is None and s.grad is not None and s.grad.abs().sum() > 0
        s.grad = None


# ------------------------------------------------------------------------------ the verl loss wrapper


def _micro_batch(rows, num_targets):
    """rows: list of (prompt_len, student_lp[resp], teacher_lp[resp], hindsight_mask[resp]); the teacher's log-probs
    go into verl's layout (one row per prompt + response token, response token j described by row p - 1 + j)."""
    nested = lambda xs, dt: torch.nested.as_nested_tensor([torch.tensor(x, dtype=dt) for x in xs],
                                                          layout=torch.jagged)
    prompts = [[1] * p for p, *_ in rows]
    responses = [[2] * len(lp) for _, lp, _, _ in rows]
    data = TensorDict({
        "prompts": nested(prompts, torch.int64),
        "responses": nested(responses, torch.int64),
        "response_mask": nested([[1] * len(r) for r in responses], torch.int64),
        "old_log_probs": nested([lp for _, lp, _, _ in rows], torch.float32),
        "advantages": nested([[0.0] * len(lp) for _, lp, _, _ in rows], torch.float32),
        "teacher_logprobs": nested([[[0.0]] * (p - 1) + [[x] for x in t] + [[0.0]] for p, _, t, _ in rows],
                                   torch.float32),
        "teacher_ids": nested([[[0]] * (p - 1) + [[2] for _ in t] + [[0]] for p, _, t, _ in rows], torch.int64),
        "hindsight_mask": nested([m for *_, m in rows], torch.int64),
    }, batch_size=len(rows))
    tu.assign_non_tensor(data, dp_size=1, batch_num_tokens=sum(len(r) for r in responses), global_batch_size=len(rows),
                         hindsight_num_targets=num_targets, hs_global_step=0)
    # model output: log-probs over the full sequence, shifted by one (position i scores token i + 1)
    full = []
    leaves = []
    for p, lp, _, _ in rows:
        student = torch.tensor(lp, dtype=torch.float32, requires_grad=True)
        leaves.append(student)
        full.append(torch.cat([torch.zeros(p - 1), student, torch.zeros(1)]))
    log_probs = torch.nested.as_nested_tensor(full, layout=torch.jagged)
    return data, {"log_probs": log_probs}, leaves


def _actor_config():
    return ActorConfig(strategy="fsdp2", ppo_mini_batch_size=4, ppo_micro_batch_size_per_gpu=4, rollout_n=1)


ROWS = [
    (3, [-1.0, -2.0, -0.5], [-0.5, -2.5, -0.7], [1, 0, 1]),
    (2, [-0.1, -3.0], [-0.2, -1.0], [0, 1]),
]


def _direct(rows):
    num, den = 0.0, 0
    for _, lp, t, m in rows:
        for a, b, keep in zip(lp, t, m):
            if keep:
                r = b - a
                num += torch.exp(torch.tensor(r)).item() - r - 1
                den += 1
    return num / den


def test_loss_is_the_targeted_token_mean_and_grad_only_on_targets():
    distill = DistillConfig(coef=2.0, divergence="k3", policy_gradient=False)
    data, out, leaves = _micro_batch(ROWS, num_targets=3)
    loss, metrics = hindsight_ppo_loss(_actor_config(), out, data, distill=distill)
    assert loss.item() == pytest.approx(2.0 * _direct(ROWS), rel=1e-5)
    assert metrics["hindsight/distill_loss"].aggregate() == pytest.approx(_direct(ROWS), rel=1e-5)
    loss.backward()
    for leaf, (_, _, _, m) in zip(leaves, ROWS):
        for g, keep in zip(leaf.grad.tolist(), m):
            assert (g != 0) == bool(keep)


def test_value_does_not_shrink_with_untargeted_tokens():
    distill = DistillConfig(coef=1.0, divergence="k3", policy_gradient=False)
    data, out, _ = _micro_batch(ROWS, num_targets=3)
    base, _ = hindsight_ppo_loss(_actor_config(), out, data, distill=distill)
    untargeted = ROWS + [(4, [-1.0] * 20, [-3.0] * 20, [0] * 20)]
    data, out, _ = _micro_batch(untargeted, num_targets=3)
    more, _ = hindsight_ppo_loss(_actor_config(), out, data, distill=distill)
    assert more.item() == pytest.approx(base.item(), rel=1e-6)


def test_micro_batches_sum_to_the_full_batch_value():
    distill = DistillConfig(coef=1.0, divergence="jsd", jsd_beta=0.3, policy_gradient=False)
    data, out, _ = _micro_batch(ROWS, num_targets=3)
    full, _ = hindsight_ppo_loss(_actor_config(), out, data, distill=distill)
    parts = 0.0
    for row in ROWS:  # one row per micro-batch, the global count stays the batch's
        data, out, _ = _micro_batch([row], num_targets=3)
        part, _ = hindsight_ppo_loss(_actor_config(), out, data, distill=distill)
        parts += part.item()
    assert parts == pytest.approx(full.item(), rel=1e-5)


def test_the_normaliser_counts_targeted_response_tokens_and_is_required():
    from verl_hindsight.algo.loss import targeted_tokens

    data, out, _ = _micro_batch(ROWS, num_targets=3)
    assert int(targeted_tokens(data)) == 3  # hand count of ROWS' masks
    data["response_mask"] = torch.nested.as_nested_tensor([torch.tensor([1, 1, 0]), torch.tensor([1, 1])],
                                                          layout=torch.jagged)
    assert int(targeted_tokens(data)) == 2  # a targeted token outside the response mask is not counted
    padded = data.select("hindsight_mask", "response_mask").to_padded_tensor()
    assert int(targeted_tokens(padded)) == 2
    data, out, _ = _micro_batch(ROWS, num_targets=3)
    del data["hindsight_num_targets"]
    with pytest.raises(RuntimeError, match="hindsight_num_targets"):
        hindsight_ppo_loss(_actor_config(), out, data, distill=DistillConfig(coef=1.0, divergence="k3"))


def test_with_policy_gradient_the_pg_loss_is_kept():
    distill = DistillConfig(coef=0.5, divergence="k1")
    data, out, _ = _micro_batch(ROWS, num_targets=3)
    data["advantages"] = torch.nested.as_nested_tensor([torch.ones(3), -torch.ones(2)], layout=torch.jagged)
    loss, metrics = hindsight_ppo_loss(_actor_config(), out, data, distill=distill)
    pg = metrics["actor/pg_loss"].aggregate()
    assert loss.item() == pytest.approx(pg + 0.5 * metrics["hindsight/distill_loss"].aggregate(), rel=1e-5)


def test_config_errors():
    with pytest.raises(ValueError, match="topk must be >= 1"):
        DistillConfig(coef=1.0, divergence="topk_tail", topk=0)
    with pytest.raises(ValueError, match="trains nothing"):
        DistillConfig(coef=0.0, policy_gradient=False)
    assert DistillConfig(coef=1.0, coef_decay_steps=10).coef_at(5) == pytest.approx(0.5)
