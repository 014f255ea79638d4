"""Dataset preparation: verl-style parquet for any registered environment.

    verl-hindsight prepare-data toy OUT_DIR [--env-kwargs '{"n_doors": 4}'] [--max-train N] [--max-val N]

Writes ``OUT_DIR/train.parquet`` and ``OUT_DIR/val.parquet`` in the environment's fixed task order. Each row
selects the agent loop (``agent_name``) and carries what the loop needs in ``extra_info``: the environment
name, its constructor kwargs (JSON) and the task id. The ``prompt`` column holds only a short placeholder that
verl's dataset requires: the agent loop renders the real prompt from the environment's first observation.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional

from verl_hindsight.environment.protocol import make_env, prepare_env

TEXT_AGENT = "hindsight_text_env"
TOOL_AGENT = "hindsight_tool_env"


def env_rows(env_name: str, split: str, env_kwargs: Optional[dict] = None, limit: Optional[int] = None,
             agent_name: Optional[str] = None) -> list[dict]:
    """Rows of one split; the agent loop defaults to the tool-calling one when the environment declares tools."""
    env = make_env(env_name, **(env_kwargs or {}))
    try:
        task_ids = env.task_ids(split)
        if agent_name is None:
            agent_name = TOOL_AGENT if env.tools() is not None else TEXT_AGENT
    finally:
        env.close()
    if limit is not None:
        task_ids = task_ids[:limit]
    kwargs_json = json.dumps(env_kwargs or {}, sort_keys=True)
    return [
        {
            "data_source": f"verl_hindsight/{env_name}",
            "agent_name": agent_name,
            "prompt": [{"role": "user", "content": f"{env_name} task {task_id}"}],
            "ability": "agent",
            "reward_model": {"style": "env", "ground_truth": ""},
            "extra_info": {"env": env_name, "env_kwargs": kwargs_json, "task_id": str(task_id), "split": split,
                           "index": i},
        }
        for i, task_id in enumerate(task_ids)
    ]


def write_env_dataset(env_name: str, out_dir: str | Path, env_kwargs: Optional[dict] = None,
                      max_train: Optional[int] = None, max_val: Optional[int] = None) -> tuple[Path, Path]:
    import pandas as pd

    prepare_env(env_name, env_kwargs, progress=True)  # one-time data, here rather than in a time-limited worker
    # every row first: a failing environment leaves no folder or half-written split behind
    rows = {split: env_rows(env_name, split, env_kwargs, limit) for split, limit in (("train", max_train),
                                                                                    ("val", max_val))}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for split, split_rows in rows.items():
        path = out / f"{split}.parquet"
        # written aside and renamed: a run already training from this folder (a second demo invocation into the
        # same --run-dir) may be opening the file right now
        tmp = out / f".{split}.{os.getpid()}.parquet"
        pd.DataFrame(split_rows).to_parquet(tmp)
        os.replace(tmp, path)
        paths.append(path)
    return paths[0], paths[1]
