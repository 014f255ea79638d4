"""What sets the CPU demo's wall time, measured side by side in one run.

    python benchmarks/demo_wall_time.py [--steps 12] [--jobs 1,2,3] [--warm-model DIR] [--run-dir DIR]

1. One micro-batch (4 rows x 155 tokens, a typical toy episode) of the demo model, forward + backward in this
   process: padded rows (recipes/cpu: ``use_remove_padding: false``) vs packed rows (remove-padding), and with
   gradient checkpointing (off in recipes/cpu).
2. Runs at once (``verl-hindsight demo --jobs``): the same set of runs (GRPO, HINT-SD, SERL, ``--steps`` each, no
   early stop) through stock main_ppo with 1, 2, ... at a time; wall time of the whole set and its ratio to one at a
   time, plus the busy share of the machine's cores while one run trains alone.
The model is the demo's (``DEMO_MODEL``) after a short warm start, or ``--warm-model`` (e.g. RUN_DIR/warm_model of a
demo run). Machine load from elsewhere moves every number; the ratios come from runs made back to back.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import threading
import time
from pathlib import Path


def micro_batch_cost(model_dir: Path, rows: int = 4, tokens: int = 155, repeats: int = 10) -> dict[str, float]:
    """Forward + backward (ms, median) of one micro-batch of the demo model: ``padded`` (rows x tokens, what the
    CPU recipes run), ``padded+checkpointing``, and ``packed`` (rows concatenated with restarting position ids,
    what verl's remove-padding path runs)."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="sdpa")
    model.train()
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (rows, tokens), generator=generator)
    inputs = {"padded": {"input_ids": ids},
              "packed": {"input_ids": ids.reshape(1, -1), "position_ids": torch.arange(tokens).repeat(rows)[None]}}

    def fwd_bwd_ms(layout: str) -> float:
        times = []
        for _ in range(repeats + 2):
            start = time.perf_counter()
            logits = model(**inputs[layout], use_cache=False).logits
            logits.logsumexp(-1).mean().backward()
            times.append(time.perf_counter() - start)
        return 1000 * statistics.median(times[2:])

    result = {"padded": fwd_bwd_ms("padded"), "packed": fwd_bwd_ms("packed")}
    model.gradient_checkpointing_enable()
    result["padded+checkpointing"] = fwd_bwd_ms("padded")
    return result


def busy_share_while(fn) -> tuple[object, float]:
    """Run ``fn`` and sample the machine's non-idle CPU share (all cores) from /proc/stat every 2 s meanwhile."""
    def read() -> tuple[int, int]:
        fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
        return sum(fields), fields[3] + fields[4]

    samples: list[float] = []
    stop = threading.Event()

    def sample() -> None:
        last = read()
        while not stop.wait(2.0):
            now = read()
            total, idle = now[0] - last[0], now[1] - last[1]
            if total:
                samples.append(1 - idle / total)
            last = now

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        out = fn()
    finally:
        stop.set()
        thread.join()
    # the first and last ~30 s are Ray start-up and shut-down; the middle is training
    middle = samples[15:-15] or samples
    return out, statistics.fmean(middle) if middle else float("nan")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--jobs", default="1,2,3")
    parser.add_argument("--warm-model", default=None)
    parser.add_argument("--run-dir", default=None)
    args = parser.parse_args()

    from verl_hindsight.demo.run import DEMO_MODEL, WARM_START, DemoConfig, planned_runs, run_all
    from verl_hindsight.demo.warm_start import warm_start
    from verl_hindsight.environment.data import write_env_dataset
    from verl_hindsight.tiny_model import make_tiny_model

    run_dir = Path(args.run_dir or f"runs/bench-demo-{time.strftime('%Y%m%d-%H%M%S')}").resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    if args.warm_model:
        model = Path(args.warm_model).resolve()
    else:  # the format is enough for timing; the demo's 400 steps would only lengthen the benchmark
        model = Path(warm_start(make_tiny_model(run_dir / "tiny", seed=0, **DEMO_MODEL), run_dir / "warm",
                                steps=80, **WARM_START))
    train, val = write_env_dataset("toy", run_dir / "data", max_val=64)

    cost = micro_batch_cost(model)
    print("fwd+bwd of one 4x155-token micro-batch: " + ", ".join(f"{k} {v:.1f} ms" for k, v in cost.items())
          + f"  (packed / padded = {cost['packed'] / cost['padded']:.2f}x, checkpointing / none = "
          f"{cost['padded+checkpointing'] / cost['padded']:.2f}x)")

    walls = {}
    for jobs in [int(j) for j in args.jobs.split(",")]:
        cfg = DemoConfig(run_dir=run_dir / f"jobs{jobs}", steps=args.steps, stop_at=None, jobs=jobs,
                         test_freq=args.steps)
        cfg.run_dir.mkdir(exist_ok=True)
        start = time.monotonic()
        if jobs == 1:
            failures, busy = busy_share_while(lambda: run_all(cfg, planned_runs(cfg), model, train, val))
            print(f"one run at a time keeps {busy:.0%} of the machine's {os.cpu_count()} cores busy (start-ups included)")
        else:
            failures = run_all(cfg, planned_runs(cfg), model, train, val)
        walls[jobs] = time.monotonic() - start
        if failures:
            print(f"failed: {failures} (see their verl.log under {cfg.run_dir})")
            return 1
        print(f"--jobs {jobs}: 3 runs x {args.steps} steps in {walls[jobs]:.0f} s")
    if 1 in walls:
        for jobs, wall in walls.items():
            if jobs != 1:
                print(f"--jobs {jobs} / --jobs 1 wall time = {wall / walls[1]:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
