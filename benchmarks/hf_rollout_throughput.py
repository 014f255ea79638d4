"""Throughput of the ``hf`` rollout backend: batched waves vs one request at a time, measured side by side.

    python benchmarks/hf_rollout_throughput.py [--requests 16] [--max-tokens 64] [--skip-grpo]

Part 1 starts two servers from the same tiny model in one Ray session, identical except for
``max_num_seqs`` (the wave size: 64 vs 1, i.e. one request at a time), sends the same N concurrent
requests to each and prints wall time, tokens/s and the speed-up (target: >= 4x at 16 requests).

Part 2 runs the GRPO smoke recipe through stock ``main_ppo`` twice, batched and one-at-a-time, and prints the
mean step time and generation time over steps 2..N (step 1 includes start-up work). It uses the plugin's
``hindsight`` trainer mode (verl's sync trainer with a 50 ms replay-buffer poll instead of 2 s), otherwise the
poll interval, not generation, sets the step time.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def bench_servers(model_dir: Path, n_requests: int, max_tokens: int, repeats: int) -> dict[str, float]:
    import ray
    from transformers import AutoTokenizer
    from verl.workers.config import RolloutConfig

    from verl_hindsight.rollout.hf_server import HFRolloutServer

    tok = AutoTokenizer.from_pretrained(model_dir)
    prompts = [tok.encode(f"door {i} is {['red', 'blue', 'green'][i % 3]}; which key opens it?") for i in
               range(n_requests)]
    params = {"temperature": 1.0, "top_p": 1.0, "top_k": -1, "logprobs": True, "max_tokens": max_tokens,
              "ignore_eos": True}
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    try:
        results = {}
        for label, wave in (("batched", 64), ("one-at-a-time", 1)):
            cfg = RolloutConfig(name="hf", prompt_length=64, response_length=max_tokens, dtype="float32",
                                tensor_model_parallel_size=1, max_num_seqs=wave)
            server = ray.remote(HFRolloutServer).options(max_concurrency=256).remote(
                config=cfg, model_config={"path": str(model_dir)})
            ray.get(server.generate.remote(prompts[0], dict(params, max_tokens=2), "warmup"))
            times = []
            for r in range(repeats):
                t0 = time.perf_counter()
                outs = ray.get([server.generate.remote(p, dict(params, seed=i), f"{label}-{r}-{i}")
                                for i, p in enumerate(prompts)])
                times.append(time.perf_counter() - t0)
            tokens = sum(len(o.token_ids) for o in outs)
            stats = ray.get(server.get_stats.remote())
            results[label] = min(times)
            print(f"  {label:>14}: {min(times):6.3f} s  {tokens / min(times):8.1f} tok/s  "
                  f"(largest wave {stats['max_wave']}, best of {repeats})")
            ray.kill(server)
        return results
    finally:
        ray.shutdown()


def grpo_step_times(model_dir: Path, work: Path, steps: int, max_num_seqs: int) -> dict[str, float]:
    from verl_hindsight.launch import main_ppo_command
    from verl_hindsight.tasks.letters import write_dataset

    run = work / f"grpo_{max_num_seqs}"
    run.mkdir(parents=True, exist_ok=True)
    train, val = write_dataset(run / "data")
    metrics = run / "metrics.jsonl"
    cmd = main_ppo_command("cpu/grpo_smoke", [
        f"actor_rollout_ref.model.path={model_dir}", f"data.train_files={train}", f"data.val_files={val}",
        f"trainer.total_training_steps={steps}", f"actor_rollout_ref.rollout.max_num_seqs={max_num_seqs}",
        "trainer.v1.trainer_mode=hindsight", "hindsight.replay_poll_interval_s=0.05",
    ])
    env = dict(os.environ, VERL_FILE_LOGGER_PATH=str(metrics))
    with open(run / "verl.log", "w") as log:
        rc = subprocess.run(cmd, cwd=run, env=env, stdout=log, stderr=subprocess.STDOUT).returncode
    if rc != 0:
        raise SystemExit(f"main_ppo failed (exit {rc}); see {run / 'verl.log'}")
    rows = [json.loads(line)["data"] for line in metrics.read_text().splitlines() if line.strip()][1:]
    return {"step": statistics.mean(r["timing_s/step"] for r in rows),
            "gen": statistics.mean(r["timing_s/gen"] for r in rows)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--grpo-steps", type=int, default=4)
    parser.add_argument("--skip-grpo", action="store_true")
    args = parser.parse_args()

    from verl_hindsight.tiny_model import make_tiny_model

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model_dir = make_tiny_model(work / "model")
        print(f"hf rollout, {args.requests} concurrent requests x {args.max_tokens} tokens, tiny model, CPU")
        res = bench_servers(model_dir, args.requests, args.max_tokens, args.repeats)
        ratio = res["one-at-a-time"] / res["batched"]
        print(f"  speed-up batched vs one-at-a-time: {ratio:.2f}x (target >= 4x)")
        if args.skip_grpo:
            return 0
        print(f"GRPO smoke recipe through main_ppo, mean over steps 2..{args.grpo_steps}")
        batched = grpo_step_times(model_dir, work, args.grpo_steps, 1024)
        serial = grpo_step_times(model_dir, work, args.grpo_steps, 1)
        for label, t in (("batched", batched), ("one-at-a-time", serial)):
            print(f"  {label:>14}: step {t['step']:6.2f} s   generation {t['gen']:6.2f} s")
        print(f"  step-time ratio one-at-a-time / batched: {serial['step'] / batched['step']:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
