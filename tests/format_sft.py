"""Teach a tiny random model the toy agent's *output format* only (test helper).

The demo's warm start with no hints: chat-rendered toy episodes whose assistant turns are ``<action>K</action>``
with K drawn uniformly at random, so the model learns to answer in the tag format but nothing about which key
is right.
"""

from verl_hindsight.demo.warm_start import warm_start


def format_sft(model_dir, out_dir, steps: int = 120, seed: int = 0, lr: float = 3e-3) -> str:
    return warm_start(model_dir, out_dir, steps=steps, seed=seed, lr=lr, hint_prob=0.0)
