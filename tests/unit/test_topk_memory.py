"""The top-k + tail student hook computes only targeted positions: outputs and gradient against a plain
full-vocabulary computation, and the memory it keeps for backward grows with the targeted tokens, not all tokens."""

import pytest
import torch
from tensordict import TensorDict

from verl_hindsight.algo.divergences import topk_tail_reverse_kl
from verl_hindsight.algo.topk_distill import (
    STUDENT_KL_KEY,
    STUDENT_MASS_KEY,
    TEACHER_MASS_KEY,
    _chunked_gather_log_probs,
    student_topk_tail_kl,
)

K = 4
KEYS = (STUDENT_KL_KEY, STUDENT_MASS_KEY, TEACHER_MASS_KEY)


def _nested(rows):
    return torch.nested.as_nested_tensor(list(rows), layout=torch.jagged)


def _case(gen, lengths, n_targeted, vocab):
    """Packed teacher top-k in verl's layout (jagged rows, as the hindsight stage hands them to the hook): a real
    top-k at ``n_targeted`` random packed positions, zeros everywhere else."""
    n = sum(lengths)
    ids = torch.zeros(n, K, dtype=torch.long)
    lps = torch.zeros(n, K)
    targeted = torch.randperm(n, generator=gen)[:n_targeted]
    top, top_ids = torch.log_softmax(torch.randn(n_targeted, vocab, generator=gen) * 3, -1).topk(K)
    ids[targeted], lps[targeted] = top_ids, top
    data = TensorDict({"teacher_ids": _nested(ids.split(lengths)), "teacher_logprobs": _nested(lps.split(lengths))},
                      batch_size=len(lengths))
    return data, ids, lps


def _reference(logits, ids, lps):
    """Every position through a full-vocabulary log_softmax, then the top-k + tail KL where a teacher exists."""
    student = torch.log_softmax(logits[0].float(), -1).gather(-1, ids)
    has = lps.ne(0).any(-1)
    kl, s_mass, t_mass = (torch.zeros(len(ids)) for _ in range(3))
    kl[has] = topk_tail_reverse_kl(student[has], lps[has])
    s_mass[has] = student.detach()[has].exp().sum(-1)
    t_mass[has] = lps[has].exp().sum(-1)
    return dict(zip(KEYS, (kl.unsqueeze(0), s_mass.unsqueeze(0), t_mass.unsqueeze(0))))


def _compare(lengths, n_targeted, vocab, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    data, ids, lps = _case(gen, lengths, n_targeted, vocab)
    base = (torch.randn(1, sum(lengths), vocab, generator=gen) * 2).to(dtype)
    weights = torch.rand(1, sum(lengths), generator=gen)  # a non-uniform upstream gradient

    logits = base.clone().requires_grad_(True)
    out = student_topk_tail_kl(logits, data)
    (out[STUDENT_KL_KEY] * weights).sum().backward()

    ref_logits = base.float().requires_grad_(True)
    ref = _reference(ref_logits, ids, lps)
    (ref[STUDENT_KL_KEY] * weights).sum().backward()
    return out, ref, logits.grad, ref_logits.grad


@pytest.mark.parametrize("n_targeted", [1, 9, 40])
def test_outputs_and_gradient_equal_the_full_vocabulary_reference(n_targeted):
    out, ref, grad, ref_grad = _compare([7, 13, 20], n_targeted, vocab=50, dtype=torch.float32, seed=n_targeted)
    for key in KEYS:
        assert out[key].shape == (1, 40) and out[key].dtype == torch.float32
        torch.testing.assert_close(out[key], ref[key], atol=1e-6, rtol=0)
    assert int(out[STUDENT_KL_KEY].ne(0).sum()) == n_targeted  # zeros exactly where there is no teacher
    torch.testing.assert_close(grad, ref_grad, atol=1e-6, rtol=0)
    assert ref_grad.abs().sum() > 0


def test_bf16_logits_equal_the_reference_on_their_fp32_upcast():
    """Under mixed precision the logits are bf16; the hook still computes in fp32 from their exact upcast."""
    out, ref, grad, ref_grad = _compare([30, 34], 12, vocab=64, dtype=torch.bfloat16, seed=5)
    for key in KEYS:
        assert out[key].dtype == torch.float32
        torch.testing.assert_close(out[key], ref[key], atol=1e-6, rtol=0)
    assert grad.dtype == torch.bfloat16
    torch.testing.assert_close(grad, ref_grad.bfloat16())


def test_no_targeted_position_gives_zeros_that_still_backpropagate():
    gen = torch.Generator().manual_seed(0)
    data, _, _ = _case(gen, [5, 6], 0, vocab=20)
    logits = torch.randn(1, 11, 20, generator=gen, requires_grad=True)
    out = student_topk_tail_kl(logits, data)
    for key in KEYS:
        assert out[key].shape == (1, 11) and out[key].dtype == torch.float32 and not out[key].any()
    assert out[STUDENT_KL_KEY].requires_grad
    out[STUDENT_KL_KEY].sum().backward()  # the loss's backward must not fail on a micro-batch with no targets
    assert logits.grad is not None and not logits.grad.any()


def test_row_selection_across_several_chunks():
    gen = torch.Generator().manual_seed(4)
    logits = torch.randn(1, 23, 30, generator=gen)
    ids = torch.randint(0, 30, (23, K), generator=gen)
    rows = torch.tensor([0, 2, 3, 8, 9, 10, 17, 22])
    got = _chunked_gather_log_probs(logits, ids[rows], chunk=3, rows=rows)
    torch.testing.assert_close(got, torch.log_softmax(logits[0], -1).gather(-1, ids)[rows], atol=1e-6, rtol=0)


def _bytes_saved_for_backward(n_targeted, n=2048, vocab=4096):
    gen = torch.Generator().manual_seed(n_targeted)
    data, _, _ = _case(gen, [n // 4] * 4, n_targeted, vocab)
    logits = torch.randn(1, n, vocab, generator=gen, requires_grad=True)
    seen = {}

    def pack(t):
        seen[t.data_ptr()] = t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = student_topk_tail_kl(logits, data)
    out[STUDENT_KL_KEY].sum().backward()  # the graph kept is a usable one
    return sum(seen.values())


def test_memory_saved_for_backward_scales_with_targeted_tokens():
    few, every = _bytes_saved_for_backward(64), _bytes_saved_for_backward(2048)
    assert every >= 2048 * 4096 * 4  # one fp32 vocabulary row per computed token
    assert few < 0.1 * every
