"""``letters``: a single-turn smoke task whose reward has variance even for a random model.

Prompt: "Write the letter <c> many times." Reward: the fraction of the response's characters that are <c>
(0..1). A random tiny model emits mixed bytes, so GRPO groups have non-zero reward spread and the policy
gradient is non-zero from the first step: a real signal for checking that training runs end to end. It is a
plumbing check, not a benchmark.

Used as ``reward.custom_reward_function.path=pkg://verl_hindsight.tasks.letters``.
"""

from __future__ import annotations

import random
from pathlib import Path

DATA_SOURCE = "verl_hindsight/letters"
LETTERS = "abcdefghijklmnopqrstuvwxyz"


def make_rows(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        letter = rng.choice(LETTERS)
        rows.append({
            "data_source": DATA_SOURCE,
            "prompt": [{"role": "user", "content": f"Write the letter {letter} many times."}],
            "ability": "format",
            "reward_model": {"style": "rule", "ground_truth": letter},
            "extra_info": {"index": i, "split_seed": seed},
        })
    return rows


def write_dataset(out_dir: str | Path, n_train: int = 64, n_val: int = 16, seed: int = 0) -> tuple[Path, Path]:
    """Write ``train.parquet`` and ``val.parquet`` (disjoint seeds, fixed order) in verl's RL format."""
    import pandas as pd

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    train, val = out / "train.parquet", out / "val.parquet"
    pd.DataFrame(make_rows(n_train, seed)).to_parquet(train)
    pd.DataFrame(make_rows(n_val, seed + 10_000)).to_parquet(val)
    return train, val


def score(response: str, letter: str) -> float:
    if not response:
        return 0.0
    return sum(ch == letter for ch in response) / len(response)


def compute_score(data_source, solution_str, ground_truth, extra_info=None, **kwargs) -> float:
    """verl custom reward function signature."""
    if data_source != DATA_SOURCE:
        raise ValueError(f"letters reward got data_source={data_source!r}; it only scores {DATA_SOURCE!r}")
    return score(solution_str, ground_truth)
