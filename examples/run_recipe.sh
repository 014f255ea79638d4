#!/usr/bin/env bash
# Launch one shipped GPU recipe through stock main_ppo, in the style of verl's example scripts.
#
#   bash examples/run_recipe.sh ENV METHOD [hydra overrides...]    # e.g. alfworld serl; the per-recipe scripts
#                                                                  # (examples/<env>/run_<method>.sh) call this
# Environment variables (defaults in brackets):
#   NNODES [1], N_GPUS [8]       trainer.nnodes / trainer.n_gpus_per_node (the recipes are sized for 1 x 8 x 80 GB)
#   DATA_DIR [data/ENV]          where `verl-hindsight prepare-data ENV DIR` wrote train.parquet and val.parquet
#   MODEL [the recipe's]         actor_rollout_ref.model.path
#   PROJECT [verl_hindsight], EXPERIMENT [ENV_METHOD], LOGGER ['[console,wandb]']   trainer.* logging
#   CHECK_FIT [1]                run `verl-hindsight plan` first and stop, with its reason, when the run does not fit
#   GPU_MEM [from nvidia-smi]    GiB per GPU for that check (80 for an 80 GB card)
#   DRY_RUN [0]                  1: check and print the command, do not train
set -euo pipefail

if [ $# -lt 2 ]; then
    echo "usage: $0 ENV METHOD [hydra overrides...]  (ENV: alfworld webshop bfcl tau appworld)" >&2
    exit 2
fi
ENV_NAME=$1
METHOD=$2
shift 2

NNODES=${NNODES:-1}
N_GPUS=${N_GPUS:-8}
DATA_DIR=${DATA_DIR:-data/$ENV_NAME}
PROJECT=${PROJECT:-verl_hindsight}
EXPERIMENT=${EXPERIMENT:-${ENV_NAME}_${METHOD}}
LOGGER=${LOGGER:-'[console,wandb]'}
CHECK_FIT=${CHECK_FIT:-1}
DRY_RUN=${DRY_RUN:-0}

for split in train val; do
    if [ ! -f "$DATA_DIR/$split.parquet" ]; then
        echo "$DATA_DIR/$split.parquet not found: run \`verl-hindsight prepare-data $ENV_NAME $DATA_DIR\` first" \
             "(or set DATA_DIR)" >&2
        exit 1
    fi
done

ARGS=(
    "data.train_files=$DATA_DIR/train.parquet"
    "data.val_files=$DATA_DIR/val.parquet"
    "trainer.nnodes=$NNODES"
    "trainer.n_gpus_per_node=$N_GPUS"
    "trainer.project_name=$PROJECT"
    "trainer.experiment_name=$EXPERIMENT"
    "trainer.logger=$LOGGER"
)
if [ -n "${MODEL:-}" ]; then
    ARGS+=("actor_rollout_ref.model.path=$MODEL")
fi

if [ "$CHECK_FIT" = 1 ]; then
    if [ -z "${GPU_MEM:-}" ]; then
        if ! command -v nvidia-smi > /dev/null; then
            echo "GPU_MEM is unset and nvidia-smi is not here: set GPU_MEM (GiB per GPU) or CHECK_FIT=0" >&2
            exit 2
        fi
        GPU_MEM=$(nvidia-smi --query-gpu=memory.total --format=csv,noheader,nounits | head -n 1 |
                  awk '{ printf "%d", $1 / 1024 }')
    fi
    # the planner's estimate; its last line says what to change when the run does not fit
    verl-hindsight plan "$ENV_NAME/$METHOD" "${ARGS[@]}" "$@" --gpu-mem "$GPU_MEM"
fi

CMD=(python3 -m verl.trainer.main_ppo --config-path "$(verl-hindsight recipes)/$ENV_NAME" --config-name "$METHOD"
     "${ARGS[@]}" "$@")
echo "${CMD[@]}"
if [ "$DRY_RUN" = 1 ]; then
    exit 0
fi
exec "${CMD[@]}"
