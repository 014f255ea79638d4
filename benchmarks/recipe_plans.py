"""The memory planner's verdict for every shipped GPU recipe, as the markdown table in docs/gpu.md.

    python benchmarks/recipe_plans.py                       # at each recipe's own GPU count, 80 GiB per GPU
    python benchmarks/recipe_plans.py --gpus 8 4 --gpu-mem 80

Composes each recipe as main_ppo would (`verl-hindsight plan`'s own code) and prints one row per recipe and GPU
count: both phases' peaks per GPU, host RAM per node, the verdict and the knobs the plan names.
"""

from __future__ import annotations

import argparse

from verl_hindsight.launch import gpu_recipe_names
from verl_hindsight.plan import PlanInputError, compose_recipe, plan

PREFIX = "actor_rollout_ref."


def row(recipe: str, gpus: int | None, gpu_mem: float) -> str:
    cfg = compose_recipe(recipe, ["data.train_files=x", "data.val_files=y"])
    try:
        result = plan(cfg, gpus, gpu_mem)
    except PlanInputError as exc:  # e.g. a rollout TP that does not divide this GPU count
        return f"| {recipe} | {gpus} | | | | no | {str(exc).replace(PREFIX, '')} | |"
    first, *rest = result.problems or [None]
    reason = (f"{first.part}: {first.need_bytes / 2**30:.1f} of {max(first.have_bytes, 0) / 2**30:.1f} GiB → "
              f"{first.knob}") if first else ""
    then = "; ".join(p.knob for p in rest)
    return (f"| {recipe} | {result.gpus_per_node} | {result.training_gib:.1f} | {result.rollout_gib:.1f} | "
            f"{result.host_bytes_per_node / 2**30:.1f} | {'yes' if result.fits else 'no'} | "
            f"{reason.replace(PREFIX, '')} | {then.replace(PREFIX, '')} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gpus", type=int, nargs="*", default=[None], help="GPU counts per node (default: the "
                        "recipe's trainer.n_gpus_per_node)")
    parser.add_argument("--gpu-mem", type=float, default=80.0, help="GiB per GPU")
    args = parser.parse_args()
    print("| recipe | GPUs | training GiB/GPU | rollout GiB/GPU | host GiB/node | fits? | reason: first knob to turn "
          "| then |")
    print("|---|---|---|---|---|---|---|---|")
    for recipe in gpu_recipe_names():
        for gpus in args.gpus:
            print(row(recipe, gpus, args.gpu_mem))


if __name__ == "__main__":
    main()
