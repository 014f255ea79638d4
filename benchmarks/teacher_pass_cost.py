"""Cost of the hindsight teacher pass: isolated vs cumulative splicing vs one student forward, side by side.

    python benchmarks/teacher_pass_cost.py [--turns-per-message 64] [--feedback-words 12] [--repeats 3]

For trajectories with 2, 8 and 16 target turns (every turn targeted), builds the teacher sequences with
:func:`plan_teacher_sequences` and times a plain transformers forward over them on CPU, next to one forward of
the student sequence. Prints tokens forwarded and wall time, each as a ratio to the student forward.
Targets: cumulative within 1.2x of one student forward at any number of target turns; isolated never
forwards past a target's action and reports its cost so users can choose.
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from pathlib import Path


def build_trajectory(tok, rng, n_turns: int, message_tokens: int):
    enc = lambda s: tok.encode(s, add_special_tokens=False)  # noqa: E731
    normal = [i for i in range(len(tok)) if i not in tok.all_special_ids]
    prompt = enc("<|im_start|>system\nOpen every door.<|im_end|>\n<|im_start|>user\nDoor 1 is red.<|im_end|>\n"
                 "<|im_start|>assistant\n")
    response, turns = [], []
    for k in range(n_turns):
        if k:
            response += enc(f"\n<|im_start|>user\nDoor {k + 1} of {n_turns} is blue; the previous key failed."
                            "<|im_end|>\n<|im_start|>assistant\n")
        start = len(response)
        message = [rng.choice(normal) for _ in range(message_tokens)] + [tok.eos_token_id]
        response += message
        turns.append((k, start, start + message_tokens - 8, start + message_tokens))  # action = last 8 tokens
    return prompt, response, turns


def time_forward(model, sequences, repeats: int) -> float:
    import torch

    best = float("inf")
    with torch.no_grad():
        for _ in range(repeats):
            t0 = time.perf_counter()
            for seq in sequences:
                model(input_ids=torch.as_tensor(seq).unsqueeze(0))
            best = min(best, time.perf_counter() - t0)
    return best


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--message-tokens", type=int, nargs="+", default=[64, 256],
                        help="tokens per assistant message (reasoning + action); one table per value")
    parser.add_argument("--feedback-words", type=int, default=12)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from verl_hindsight.hindsight.teacher_sequences import FeedbackRenderer
    from verl_hindsight.tiny_model import make_tiny_model

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = make_tiny_model(Path(tmp) / "m", hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                                    num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=8192)
        tok = AutoTokenizer.from_pretrained(model_dir)
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="sdpa").eval()
        renderer = FeedbackRenderer(tok, hf_model_type="qwen2")
        feedback = " ".join(["the blue door opens with D"] * max(1, args.feedback_words // 6))
        rng = random.Random(0)
        for message_tokens in args.message_tokens:
            table(model, tok, renderer, feedback, rng, message_tokens, args.repeats)
    return 0


def table(model, tok, renderer, feedback, rng, message_tokens, repeats):
    from verl_hindsight.hindsight.teacher_sequences import TargetTurn, plan_teacher_sequences

    print(f"\nteacher pass on CPU (1 thread), model hidden 256 x 4 layers, {message_tokens}-token messages, "
          f"feedback {len(renderer.feedback_ids(feedback))} tokens; ratios are to one student forward")
    print(f"{'targets':>7}  {'student tok':>11}  {'mode':>10}  {'seqs':>4}  {'tokens':>7}  {'tok ratio':>9}  "
          f"{'time s':>7}  {'time ratio':>10}")
    for n in (2, 8, 16):
        prompt, response, turns = build_trajectory(tok, rng, n, message_tokens)
        student = prompt + response
        t_student = time_forward(model, [student], repeats)
        targets = [TargetTurn(k, s, a, b, feedback) for k, s, a, b in turns]
        print(f"{n:>7}  {len(student):>11}  {'student':>10}  {1:>4}  {len(student):>7}  {1.0:>9.2f}  "
              f"{t_student:>7.3f}  {1.0:>10.2f}")
        for mode in ("cumulative", "isolated"):
            plan = plan_teacher_sequences(prompt, response, targets, renderer, mode=mode)
            seqs = [s.token_ids for s in plan.sequences]
            tokens = sum(map(len, seqs))
            t = time_forward(model, seqs, repeats)
            print(f"{n:>7}  {len(student):>11}  {mode:>10}  {len(seqs):>4}  {tokens:>7}  "
                  f"{tokens / len(student):>9.2f}  {t:>7.3f}  {t / t_student:>10.2f}")


if __name__ == "__main__":
    sys.exit(main())
