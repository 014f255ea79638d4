"""What a moving teacher costs, LoRA vs full fine-tuning, side by side on the same model in one run.

    python benchmarks/lora_teacher_cost.py [--steps 4] [--hidden 256] [--layers 4] [--kind ema] [--lora-rank 16]

Builds one tiny Qwen2 model (``--hidden``/``--layers``) and gives it the demo's warm start (``--warm-steps``, enough
for the ``<action>`` format, so failing turns carry actions for the teacher to score), writes the toy corridor's
data, then runs HINT-SD through stock ``main_ppo`` twice, at the same time (so both see the same load on the
machine), with the same seed and a moving teacher (``--kind`` ema or lagged, synced every step):
``recipes/cpu/toy_hint_sd`` (full fine-tuning: the teacher keeps its own copy of the weights, since the KL anchor
stays on the initial policy) and ``recipes/cpu/toy_hint_sd_lora`` (the teacher is a second adapter). From each
run's metrics it prints

* ``teacher state``: bytes the teacher holds of its own on one rank (``hindsight/teacher_state_bytes``);
* ``teacher pass``: seconds per step of the teacher's forwards (``timing_s/hindsight_teacher``), the same per 1k
  teacher tokens (the runs target different turns once their policies differ), and of swapping its weights in and
  out (``timing_s/hindsight_teacher_swap``), medians over the steps after the first. Full fine-tuning scores the
  teacher with the reference model's engine, LoRA with the actor's (verl keeps the reference inside it);
* ``teacher update``: the EMA lerp / lagged copy after each update (inside ``timing_s/update_actor``, not separable;
  the actor update's median is printed next to it);
* the step's median wall time;

and the LoRA/full ratio of each. The adapter's share of the model follows from ``--hidden``, ``--layers`` and
``--lora-rank``; at 7B with rank 32 on every linear layer it is ~1%.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from verl_hindsight.launch import main_ppo_command

METRICS = (("teacher state (MB per rank)", "hindsight/teacher_state_bytes", 1 / 2**20),
           ("teacher tokens forwarded (per step)", "hindsight/teacher_tokens_forwarded", 1.0),
           ("teacher forwards (s/step)", "timing_s/hindsight_teacher", 1.0),
           ("teacher forwards (s per 1k tokens)", "teacher_s_per_1k_tokens", 1.0),
           ("teacher swap in+out (s/step)", "timing_s/hindsight_teacher_swap", 1.0),
           ("actor update incl. teacher update (s/step)", "timing_s/update_actor", 1.0),
           ("step (s)", "timing_s/step", 1.0))


def run(recipe: str, model: Path, data: Path, work: Path, steps: int, kind: str, lora_rank: int) -> list[dict]:
    work.mkdir(parents=True)
    overrides = [f"actor_rollout_ref.model.path={model}", f"data.train_files={data / 'train.parquet'}",
                 f"data.val_files={data / 'val.parquet'}", f"trainer.total_training_steps={steps}",
                 f"trainer.default_local_dir={work / 'ckpt'}", f"hindsight.teacher.kind={kind}",
                 "hindsight.teacher.sync_interval=1", "trainer.val_before_train=false"]
    if recipe.endswith("_lora"):
        overrides += [f"actor_rollout_ref.model.lora_rank={lora_rank}", f"actor_rollout_ref.model.lora_alpha={2 * lora_rank}"]
    env = dict(os.environ, VERL_FILE_LOGGER_PATH=str(work / "metrics.jsonl"))
    proc = subprocess.run(main_ppo_command(recipe, overrides), cwd=work, env=env, capture_output=True, text=True)
    (work / "log.txt").write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        raise SystemExit(f"{recipe} failed (rc {proc.returncode}); log: {work / 'log.txt'}")
    return [json.loads(line)["data"] for line in (work / "metrics.jsonl").read_text().splitlines() if line.strip()]


def with_rates(rows: list[dict]) -> list[dict]:
    for m in rows:
        if m.get("hindsight/teacher_tokens_forwarded"):
            m["teacher_s_per_1k_tokens"] = 1000 * m["timing_s/hindsight_teacher"] / m["hindsight/teacher_tokens_forwarded"]
    return rows


def median_after_first(rows: list[dict], key: str) -> float:
    values = [m[key] for m in rows[1:] if key in m] or [m[key] for m in rows if key in m]
    return statistics.median(values) if values else float("nan")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--kind", choices=("ema", "lagged"), default="ema")
    parser.add_argument("--lora-rank", type=int, default=16)
    parser.add_argument("--warm-steps", type=int, default=80)
    parser.add_argument("--work-dir", help="keep the runs here (default: a temporary folder)")
    args = parser.parse_args()

    from verl_hindsight.environment.data import write_env_dataset
    from verl_hindsight.tiny_model import make_tiny_model

    work = Path(args.work_dir or tempfile.mkdtemp(prefix="lora_teacher_"))
    from verl_hindsight.demo.warm_start import warm_start

    tiny = make_tiny_model(work / "tiny", hidden_size=args.hidden, intermediate_size=4 * args.hidden,
                           num_hidden_layers=args.layers, num_attention_heads=args.hidden // 32,
                           num_key_value_heads=args.hidden // 64)
    model = Path(warm_start(tiny, work / "model", steps=args.warm_steps, lr=1e-3, hint_prob=0.75))
    write_env_dataset("toy", work / "data", max_train=16, max_val=4)
    from safetensors import safe_open

    with safe_open(str(model / "model.safetensors"), "pt") as f:
        model_bytes = sum(f.get_tensor(k).numel() * 4 for k in f.keys())
    print(f"model: hidden {args.hidden}, {args.layers} layers, {model_bytes / 2**20:.1f} MB fp32; teacher {args.kind}, "
          f"synced every step; LoRA rank {args.lora_rank} on every linear layer; {args.steps} steps each", flush=True)
    from concurrent.futures import ThreadPoolExecutor

    recipes = {"full": "cpu/toy_hint_sd", "lora": "cpu/toy_hint_sd_lora"}
    with ThreadPoolExecutor(max_workers=2) as pool:
        futures = {name: pool.submit(run, recipe, model, work / "data", work / name, args.steps, args.kind,
                                     args.lora_rank) for name, recipe in recipes.items()}
        results = {name: with_rates(future.result()) for name, future in futures.items()}
    print(f"\n{'':44s}{'full':>12s}{'LoRA':>12s}{'LoRA/full':>11s}")
    for label, key, scale in METRICS:
        full, lora = (median_after_first(results[n], key) * scale for n in ("full", "lora"))
        ratio = lora / full if full else float("nan")
        print(f"{label:44s}{full:12.4f}{lora:12.4f}{ratio:11.3f}")
    print(f"\nruns and logs: {work}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
