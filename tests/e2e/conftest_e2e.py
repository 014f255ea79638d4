"""Running a recipe through stock ``python -m verl.trainer.main_ppo`` and reading its per-step metrics."""

import json
import os
import subprocess
import sys

from verl_hindsight.launch import is_port_race, main_ppo_command

#: the sequence the trainer scores with ``hindsight.teacher.log_probe`` (``HindsightTrainer._probe_metrics``)
PROBE = list(range(3, 35))


def base_model_probe(model_dir) -> float:
    """log p(probe) under the model in ``model_dir`` by a plain fp32 transformers forward (no verl, no adapter)."""
    import torch
    from transformers import AutoModelForCausalLM

    ids = torch.tensor(PROBE)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(ids[None]).logits[0, :-1]
    return float(torch.log_softmax(logits, -1).gather(-1, ids[1:, None]).sum())


def probe_gap_per_token(a: float, b: float) -> float:
    """|a - b| of two probe log-probs, per scored token."""
    return abs(a - b) / (len(PROBE) - 1)


def run_recipe(recipe, tmp_path, overrides, extra_env=None, expect_ok=True):
    """``recipe`` None: verl's own default config (``ppo_trainer``), as a stock user runs it."""
    metrics = tmp_path / "metrics.jsonl"
    metrics.unlink(missing_ok=True)
    env = {k: v for k, v in os.environ.items() if k != "VERL_USE_EXTERNAL_MODULES"}
    env.update(VERL_FILE_LOGGER_PATH=str(metrics), **(extra_env or {}))
    for _ in range(2):
        cmd = main_ppo_command(recipe, overrides) if recipe else [sys.executable, "-m", "verl.trainer.main_ppo",
                                                                   *overrides]
        proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
        log = proc.stdout + proc.stderr
        if proc.returncode == 0 or not is_port_race(log):  # seen once in CI: EADDRINUSE at init_model
            break
        metrics.unlink(missing_ok=True)
    (tmp_path / "verl.log").write_text(log)
    if not expect_ok:
        return proc.returncode, log
    assert proc.returncode == 0, log[-6000:]
    return [json.loads(line)["data"] for line in metrics.read_text().splitlines() if line.strip()]
