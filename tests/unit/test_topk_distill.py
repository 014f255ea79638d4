"""Top-k + tail distillation through verl's logits hook: layout against verl's own slicing, values against a
full-vocabulary computation, the loss through both engine calls, and the property that motivated it."""

import pytest
import torch
from tensordict import TensorDict
from verl.utils import tensordict_utils as tu
from verl.workers.config import ActorConfig
from verl.workers.utils.padding import no_padding_2_padding

from verl_hindsight.algo.divergences import k3
from verl_hindsight.algo.loss import DistillConfig, hindsight_ppo_loss
from verl_hindsight.algo.topk_distill import (
    STUDENT_KL_KEY,
    stack_topk,
    student_topk_tail_kl,
    teacher_topk_outputs,
)

V, K = 11, 3


def _nested(rows, dtype=None):
    return torch.nested.as_nested_tensor([torch.as_tensor(r, dtype=dtype) for r in rows], layout=torch.jagged)


def _verl_layout(prompt_len, response_rows):
    """Response-aligned (resp_len, K) -> verl's (prompt_len + resp_len, K): response token j is described by row
    prompt_len - 1 + j (the position whose logits predict it)."""
    full = torch.zeros((prompt_len + len(response_rows), *response_rows.shape[1:]), dtype=response_rows.dtype)
    for j in range(len(response_rows)):
        full[prompt_len - 1 + j] = response_rows[j]
    return full


def _batch(prompt_lens, teacher_rows, mask_rows):
    """A micro-batch as the actor sees it: jagged prompts/responses, the teacher's top-k in verl's layout."""
    data = TensorDict({
        "prompts": _nested([[1] * p for p in prompt_lens], torch.int64),
        "responses": _nested([[2] * len(m) for m in mask_rows], torch.int64),
        "response_mask": _nested([[1] * len(m) for m in mask_rows], torch.int64),
        "old_log_probs": _nested([[0.0] * len(m) for m in mask_rows], torch.float32),
        "advantages": _nested([[0.0] * len(m) for m in mask_rows], torch.float32),
        "hindsight_mask": _nested(mask_rows, torch.int64),
        "teacher_ids": _nested([_verl_layout(p, ids) for p, (ids, _) in zip(prompt_lens, teacher_rows)], torch.int64),
        "teacher_logprobs": _nested([_verl_layout(p, lps) for p, (_, lps) in zip(prompt_lens, teacher_rows)],
                                    torch.float32),
    }, batch_size=len(mask_rows))
    tu.assign_non_tensor(data, dp_size=1, batch_num_tokens=sum(map(len, mask_rows)), global_batch_size=len(mask_rows),
                         hindsight_num_targets=sum(map(sum, mask_rows)), hs_global_step=0)
    return data


def _teacher_row(gen, resp_len, targeted):
    """Teacher top-k from a real distribution at targeted positions, zeros elsewhere (as the stage writes)."""
    ids = torch.zeros(resp_len, K, dtype=torch.long)
    lps = torch.zeros(resp_len, K)
    for j in targeted:
        logp = torch.log_softmax(torch.randn(V, generator=gen) * 3, -1)
        top, top_ids = logp.topk(K)
        ids[j], lps[j] = top_ids, top
    return ids, lps


def _reference_kl(student_logits_row, ids, lps):
    """Reverse KL between the two (K+1)-bucket distributions, from the full softmax, in float64 (differentiable)."""
    s_full = torch.log_softmax(student_logits_row.double(), -1)
    s = s_full[ids].exp()
    t = lps.double().exp()
    s_all = torch.cat([s, (1 - s.sum()).unsqueeze(0)])
    t_all = torch.cat([t, (1 - t.sum()).unsqueeze(0)])
    return (s_all * (s_all.log() - t_all.log())).sum()


def _random_case(gen, prompt_lens, masks):
    """Teacher rows (top-k on the masked positions), the packed batch, and its total token count."""
    teacher = [_teacher_row(gen, len(m), [j for j, x in enumerate(m) if x]) for m in masks]
    return teacher, _batch(prompt_lens, teacher, masks), sum(p + len(m) for p, m in zip(prompt_lens, masks))


def test_student_hook_and_loss_equal_the_full_softmax_reference():
    gen = torch.Generator().manual_seed(1)
    prompt_lens, masks = [3, 2], [[1, 0, 1], [0, 1, 1, 0]]
    teacher, data, total = _random_case(gen, prompt_lens, masks)
    logits = torch.randn(1, total, V, generator=gen, requires_grad=True)

    out = student_topk_tail_kl(logits, data)[STUDENT_KL_KEY]
    assert out.shape == (1, total)
    per_token = no_padding_2_padding(out[0], data)
    expected, offset = [], 0
    for b, (p, m) in enumerate(zip(prompt_lens, masks)):
        for j, keep in enumerate(m):
            got = float(per_token[b, j].detach())
            if keep:
                ids, lps = teacher[b][0][j], teacher[b][1][j]
                ref = float(_reference_kl(logits[0, offset + p - 1 + j].detach(), ids, lps))
                assert got == pytest.approx(ref, rel=1e-4)  # fp32 tail bucket: 1 - sum(top-k) cancels
                expected.append(ref)
            else:
                assert got == 0.0  # untargeted: no teacher distribution there
        offset += p + len(m)

    # the loss call: the engine hands the hook's output back in model_output (nested over full sequences)
    distill = DistillConfig(coef=1.0, divergence="topk_tail", topk=K, policy_gradient=False)
    config = ActorConfig(strategy="fsdp2", ppo_mini_batch_size=2, ppo_micro_batch_size_per_gpu=2, rollout_n=1)
    hook = hindsight_ppo_loss(config, data=data, student_logits=logits, distill=distill)
    lens = [p + len(m) for p, m in zip(prompt_lens, masks)]
    model_output = {k: torch.nested.nested_tensor_from_jagged(v[0], torch.tensor([0, *torch.tensor(lens).cumsum(0)]))
                    for k, v in hook.items()}
    model_output["log_probs"] = torch.nested.nested_tensor_from_jagged(
        torch.zeros(total), torch.tensor([0, *torch.tensor(lens).cumsum(0)]))
    loss, metrics = hindsight_ppo_loss(config, model_output=model_output, data=data, distill=distill)
    assert loss.item() == pytest.approx(sum(expected) / len(expected), rel=1e-4)
    loss.backward()
    grads = logits.grad[0].abs().sum(-1)
    targeted_positions = {o + p - 1 + j for o, p, m in zip([0, lens[0]], prompt_lens, masks)
                          for j, keep in enumerate(m) if keep}
    assert {i for i in range(total) if grads[i] > 0} == targeted_positions


def test_student_hook_gradient_equals_the_full_softmax_reference():
    """d(sum of per-token KL)/d(student logits) against autograd through the float64 full-softmax reference."""
    gen = torch.Generator().manual_seed(3)
    prompt_lens, masks = [2, 4], [[1, 1, 0], [1, 0, 1, 1]]
    teacher, data, total = _random_case(gen, prompt_lens, masks)
    base = torch.randn(1, total, V, generator=gen) * 2

    logits = base.clone().requires_grad_(True)
    student_topk_tail_kl(logits, data)[STUDENT_KL_KEY].sum().backward()

    ref_logits = base.double().requires_grad_(True)
    terms, offset = [], 0
    for b, (p, m) in enumerate(zip(prompt_lens, masks)):
        for j, keep in enumerate(m):
            if keep:
                terms.append(_reference_kl(ref_logits[0, offset + p - 1 + j], teacher[b][0][j], teacher[b][1][j]))
        offset += p + len(m)
    torch.stack(terms).sum().backward()
    assert torch.allclose(logits.grad.double(), ref_logits.grad, atol=1e-5)
    assert ref_logits.grad.abs().sum() > 0


def test_teacher_hook_returns_the_top_k_of_its_logits():
    gen = torch.Generator().manual_seed(2)
    logits = torch.randn(1, 6, V, generator=gen)
    columns = teacher_topk_outputs(student_logits=logits, k=K)
    assert all(v.shape == (1, 6) for v in columns.values())  # the engine's per-token contract
    ids, lps = stack_topk(columns, K)
    ref_lp, ref_ids = torch.log_softmax(logits, -1).topk(K)
    assert torch.equal(ids, ref_ids) and torch.allclose(lps, ref_lp, atol=1e-6)
    loss, metrics = teacher_topk_outputs(model_output={}, data=None, k=K)
    assert float(loss) == 0.0 and metrics == {}


def test_topk_pulls_the_teachers_answer_up_where_k3_only_pushes_the_sampled_token_down():
    """Why the demo uses topk_tail: on a failed turn the sampled token is wrong. One gradient step of k3 on it
    raises every other token's log-prob by the same amount (the freed mass spreads over the vocabulary, format
    tokens included); the top-k + tail step raises the teacher's answer far more than any other token."""
    logits0 = torch.zeros(V)
    logits0[0] = 2.0  # the student's (wrong) favourite, which it sampled
    answer = 5  # the teacher's answer given the hint
    t = torch.full((V,), -8.0)
    t[answer] = 0.0
    t = torch.log_softmax(t, -1)

    def step(loss_fn):
        z = logits0.clone().requires_grad_(True)
        loss_fn(torch.log_softmax(z, -1)).backward()
        with torch.no_grad():
            return torch.log_softmax(z - 0.5 * z.grad, -1) - torch.log_softmax(logits0, -1)

    by_k3 = step(lambda s: k3(s[0], t[0]))
    others = [i for i in range(1, V)]
    assert torch.allclose(by_k3[others], by_k3[others][0].expand(len(others)), atol=1e-6)
    from verl_hindsight.algo.divergences import topk_tail_reverse_kl

    top = torch.tensor([answer, 0, 1])
    by_topk = step(lambda s: topk_tail_reverse_kl(s[top], t[top]))
    rest = [i for i in range(V) if i != answer]
    assert by_topk[answer] > 0 and by_topk[answer] > by_topk[rest].max() + 0.1
