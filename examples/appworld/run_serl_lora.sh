#!/usr/bin/env bash
# SERL on AppWorld with a LoRA adapter: recipes/appworld/serl_lora.yaml on one node of 8 GPUs (80 GB), vLLM rollout.
#
#   verl-hindsight prepare-data appworld data/appworld      # once; the recipe's header has the benchmark's setup
#   bash examples/appworld/run_serl_lora.sh [hydra overrides...]
#
# NNODES, N_GPUS, DATA_DIR, MODEL, PROJECT, EXPERIMENT, LOGGER, CHECK_FIT, GPU_MEM, DRY_RUN: examples/run_recipe.sh
exec bash "$(dirname "$0")/../run_recipe.sh" appworld serl_lora "$@"
