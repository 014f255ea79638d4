#!/usr/bin/env bash
# SERL on ALFWorld with a LoRA adapter: recipes/alfworld/serl_lora.yaml on one node of 8 GPUs (80 GB), vLLM rollout.
#
#   verl-hindsight prepare-data alfworld data/alfworld      # once; the recipe's header has the benchmark's setup
#   bash examples/alfworld/run_serl_lora.sh [hydra overrides...]
#
# NNODES, N_GPUS, DATA_DIR, MODEL, PROJECT, EXPERIMENT, LOGGER, CHECK_FIT, GPU_MEM, DRY_RUN: examples/run_recipe.sh
exec bash "$(dirname "$0")/../run_recipe.sh" alfworld serl_lora "$@"
