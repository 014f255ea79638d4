"""Run stock ``python -m verl.trainer.main_ppo`` with a shipped recipe, in a subprocess: the one way this package
starts training (the CLI, the demo and the benchmarks all go through it)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from importlib import resources
from pathlib import Path


def recipes_dir() -> Path:
    """Directory holding the hydra recipes (``recipes/`` in a checkout, ``verl_hindsight/recipes`` installed)."""
    path = Path(str(resources.files("verl_hindsight.recipes")))
    if not (path / "cpu").is_dir():
        raise FileNotFoundError(f"verl-hindsight recipes not found under {path}; reinstall the package")
    return path


BENCHMARK_RECIPE_DIRS = ("alfworld", "webshop", "bfcl", "tau", "appworld")


def gpu_recipe_names() -> list[str]:
    """Every shipped GPU recipe as ``main_ppo`` and ``verl-hindsight plan`` name it: the generic ones (``serl``) and
    the per-benchmark ones (``alfworld/serl_lora``)."""
    root = recipes_dir()
    generic = sorted(p.stem for p in root.glob("*.yaml") if p.stem != "hindsight_defaults")
    return generic + [f"{env}/{p.stem}" for env in BENCHMARK_RECIPE_DIRS for p in sorted((root / env).glob("*.yaml"))]


def main_ppo_command(recipe: str, overrides: list[str]) -> list[str]:
    """The stock verl command line for ``recipes/<recipe>.yaml`` (e.g. ``cpu/grpo_smoke``)."""
    group, _, name = recipe.rpartition("/")
    return [sys.executable, "-m", "verl.trainer.main_ppo", "--config-path", str(recipes_dir() / group),
            "--config-name", name, *overrides]


def read_metrics(path: Path) -> list[dict]:
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        line = line.strip()
        if line:
            rows.append(json.loads(line))
    return rows


def is_port_race(log: str) -> bool:
    """verl picks torch.distributed's MASTER_PORT as a free port and binds it later; another process (a second run
    started at the same moment, a busy CI machine) can take it in between. That race is the machine's, not the
    recipe's: callers run once more, and only for it."""
    return "EADDRINUSE" in log


def run_main_ppo(recipe: str, overrides: list[str], run_dir: Path, total_steps: int, label: str,
                 position: int = 0) -> int:
    """Run stock main_ppo in a subprocess: log to ``run_dir/verl.log``, metrics to ``run_dir/metrics.jsonl``.
    ``position`` is the progress bar's line when several runs go at once."""
    from tqdm import tqdm

    log_path, metrics_path = run_dir / "verl.log", run_dir / "metrics.jsonl"
    env = dict(os.environ, VERL_FILE_LOGGER_PATH=str(metrics_path), PYTHONUNBUFFERED="1")
    cmd = main_ppo_command(recipe, [*overrides, f"trainer.total_training_steps={total_steps}",
                                    f"trainer.default_local_dir={run_dir / 'checkpoints'}"])
    (run_dir / "command.txt").write_text(" ".join(cmd) + "\n")

    def show_progress(bar) -> None:
        done = len({row["step"] for row in read_metrics(metrics_path) if row["step"] >= 1})
        if done != bar.n:
            bar.update(done - bar.n)

    with tqdm(total=total_steps, desc=label, unit="step", position=position, leave=True) as bar:
        for attempt in range(2):
            metrics_path.unlink(missing_ok=True)
            bar.reset()
            with open(log_path, "w") as log:
                proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=run_dir, env=env)
                while proc.poll() is None:
                    time.sleep(1.0)
                    show_progress(bar)
            show_progress(bar)
            if proc.returncode == 0 or attempt or not is_port_race(log_path.read_text()):
                break
    if proc.returncode != 0:
        tail = log_path.read_text().splitlines()[-30:]
        print("\n".join(tail), file=sys.stderr)
        print(f"main_ppo failed (exit {proc.returncode}); full log: {log_path}", file=sys.stderr)
    return proc.returncode
