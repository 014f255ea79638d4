"""Running a recipe through stock ``python -m verl.trainer.main_ppo`` and reading its per-step metrics."""

import json
import os
import subprocess
import sys

from verl_hindsight.launch import is_port_race, main_ppo_command


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
