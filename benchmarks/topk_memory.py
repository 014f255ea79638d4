"""Memory of the top-k + tail student hook: all packed tokens (before) vs targeted tokens only (now), side by side.

    python benchmarks/topk_memory.py [--vocab 151936] [--tokens N] [--k 8] [--fractions 0.02 0.1 0.5 1.0]
                                     [--dtype bf16] [--device cpu|cuda] [--repeats R]

For one packed micro-batch of ``--tokens`` tokens (default 4096 on CUDA, 2048 on CPU) with a Qwen-sized vocabulary,
a random ``--fractions`` share of the tokens carries a teacher top-k (the targeted response tokens; the rest are
prompt and untargeted tokens). Runs forward + backward of the per-token KL through

- old: what :func:`student_topk_tail_kl` did before, ``_chunked_gather_log_probs`` over every packed token, so each
  token keeps an fp32 vocabulary row alive for the backward pass;
- new: :func:`student_topk_tail_kl`, which computes only the targeted tokens.

Prints, per 1k packed tokens, the bytes autograd saves for backward (``saved_tensors_hooks``) and, on CUDA, the
peak of ``torch.cuda.max_memory_allocated`` above the logits already resident (the logits' gradient included, the
same for both); then the best fwd+bwd wall time, each with the ratio new/old, and the largest difference between
the two paths' per-token KL. On CPU the run uses one thread (with more threads than free cores, as on a shared
machine, timings turn erratic) and takes about 2 minutes with the defaults.
"""

from __future__ import annotations

import argparse
import sys
import time


def old_student_topk_tail_kl(student_logits, data):
    """The hook as it was: every packed token through the fp32 gather, untargeted tokens masked afterwards."""
    import torch

    from verl_hindsight.algo.divergences import topk_tail_reverse_kl
    from verl_hindsight.algo.topk_distill import STUDENT_KL_KEY, _chunked_gather_log_probs

    ids, lps = data["teacher_ids"], data["teacher_logprobs"]
    ids = ids.values().long().unsqueeze(0).to(student_logits.device)
    lps = lps.values().float().unsqueeze(0).to(student_logits.device)
    student = _chunked_gather_log_probs(student_logits, ids)
    has_teacher = lps.ne(0).any(dim=-1)
    teacher = torch.where(has_teacher.unsqueeze(-1), lps, student.detach())
    kl = topk_tail_reverse_kl(student, teacher)
    return {STUDENT_KL_KEY: torch.where(has_teacher, kl, torch.zeros_like(kl))}


def make_batch(n_tokens, vocab, k, fraction, device, seed=0):
    """Teacher top-k in verl's packed layout (4 jagged rows) at a random ``fraction`` of the tokens, zeros elsewhere."""
    import torch
    from tensordict import TensorDict

    gen = torch.Generator().manual_seed(seed)
    n_targeted = max(1, round(fraction * n_tokens))
    ids = torch.zeros(n_tokens, k, dtype=torch.long)
    lps = torch.zeros(n_tokens, k)
    targeted = torch.randperm(n_tokens, generator=gen)[:n_targeted]
    ids[targeted] = torch.randint(0, vocab, (n_targeted, k), generator=gen)
    lps[targeted] = torch.log_softmax(torch.randn(n_targeted, k + 1, generator=gen), -1)[:, :k]
    lengths = [n_tokens // 4] * 3 + [n_tokens - 3 * (n_tokens // 4)]
    nested = lambda t: torch.nested.as_nested_tensor(list(t.split(lengths)), layout=torch.jagged)  # noqa: E731
    data = TensorDict({"teacher_ids": nested(ids), "teacher_logprobs": nested(lps)}, batch_size=len(lengths))
    return data.to(device), n_targeted


def measure(hook, logits, data, repeats):
    """(bytes saved for backward, CUDA peak above the resident logits or None, best fwd+bwd seconds, per-token KL)."""
    import torch

    from verl_hindsight.algo.topk_distill import STUDENT_KL_KEY

    cuda = logits.device.type == "cuda"
    saved = {}

    def pack(t):
        saved[t.data_ptr()] = t.numel() * t.element_size()
        return t

    best, peak, kl = float("inf"), None, None
    for r in range(repeats):
        logits.grad = None
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        t0 = time.perf_counter()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = hook(logits, data)[STUDENT_KL_KEY]
        out.sum().backward()
        if cuda:
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated() - base
        best = min(best, time.perf_counter() - t0)
        if r == 0:
            kl, saved_bytes = out.detach(), sum(saved.values())
        del out
    logits.grad = None
    return saved_bytes, peak, best, kl


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--vocab", type=int, default=151936)
    parser.add_argument("--tokens", type=int, default=None, help="packed tokens (default: 4096 on CUDA, 2048 on CPU)")
    parser.add_argument("--k", type=int, default=8)
    parser.add_argument("--fractions", type=float, nargs="+", default=[0.02, 0.1, 0.5, 1.0])
    parser.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16", help="dtype of the student logits")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=None, help="timed runs per path, best kept (default: 2 on "
                                                                  "CPU, 3 on CUDA)")
    args = parser.parse_args()

    import torch

    from verl_hindsight.algo.topk_distill import student_topk_tail_kl

    device = torch.device(args.device)
    cuda = device.type == "cuda"
    if not cuda:  # one thread: on a shared machine, more threads than free cores make the timings erratic
        torch.set_num_threads(1)
    n = args.tokens or (4096 if cuda else 2048)
    repeats = args.repeats or (3 if cuda else 2)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(1, n, args.vocab, generator=gen).mul_(2).to(device=device, dtype=dtype).requires_grad_(True)
    name = torch.cuda.get_device_name(device) if cuda else "CPU, 1 thread"
    print(f"student top-k + tail hook, {n} packed tokens, V={args.vocab}, k={args.k}, {args.dtype} logits, {name}, "
          f"best of {repeats}; memory in MiB per 1k packed tokens")
    header = f"{'targeted':>8}  {'tokens':>6}  {'saved old':>9}  {'saved new':>9}  {'new/old':>7}"
    if cuda:
        header += f"  {'peak old':>8}  {'peak new':>8}  {'new/old':>7}"
    print(header + f"  {'fwd+bwd old s':>13}  {'new s':>7}  {'new/old':>7}  {'max |dKL|':>9}")
    per_1k = lambda b: b / 2**20 / (n / 1000)  # noqa: E731
    for fraction in args.fractions:
        data, n_targeted = make_batch(n, args.vocab, args.k, fraction, device)
        s_old, p_old, t_old, kl_old = measure(old_student_topk_tail_kl, logits, data, repeats)
        s_new, p_new, t_new, kl_new = measure(student_topk_tail_kl, logits, data, repeats)
        row = (f"{fraction:>8.0%}  {n_targeted:>6}  {per_1k(s_old):>9.1f}  {per_1k(s_new):>9.1f}  "
               f"{s_new / s_old:>7.3f}")
        if cuda:
            row += f"  {per_1k(p_old):>8.1f}  {per_1k(p_new):>8.1f}  {p_new / p_old:>7.3f}"
        diff = float((kl_old - kl_new).abs().max())
        print(row + f"  {t_old:>13.3f}  {t_new:>7.3f}  {t_new / t_old:>7.3f}  {diff:>9.1e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
