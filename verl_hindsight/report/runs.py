"""Reading a run folder: ``<run_dir>/<name>-s<seed>/metrics.jsonl`` (verl's file logger) per training run."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

RUN_NAME = re.compile(r"^(?P<method>.+)-s(?P<seed>\d+)$")
VAL_KEYS = ("hindsight/val_success",)


@dataclass
class Run:
    name: str
    method: str
    seed: int
    path: Path
    steps: list[int] = field(default_factory=list)
    metrics: list[dict] = field(default_factory=list)

    def series(self, key: str) -> tuple[list[int], list[float]]:
        pairs = [(s, float(m[key])) for s, m in zip(self.steps, self.metrics) if key in m]
        return [p[0] for p in pairs], [p[1] for p in pairs]

    def val_key(self) -> Optional[str]:
        keys = {k for m in self.metrics for k in m}
        for k in VAL_KEYS:
            if k in keys:
                return k
        core = sorted(k for k in keys if k.startswith("val-core/") and k.endswith("/mean@1"))
        return core[0] if core else None


def load_runs(run_dir: Path) -> list[Run]:
    runs = []
    for metrics in sorted(Path(run_dir).glob("*/metrics.jsonl")):
        match = RUN_NAME.match(metrics.parent.name)
        if not match:
            continue
        run = Run(metrics.parent.name, match["method"], int(match["seed"]), metrics.parent)
        by_step: dict[int, dict] = {}
        for line in metrics.read_text().splitlines():
            if line.strip():
                row = json.loads(line)
                by_step.setdefault(int(row["step"]), {}).update(row["data"])
        run.steps = sorted(by_step)
        run.metrics = [by_step[s] for s in run.steps]
        runs.append(run)
    return runs
