#!/usr/bin/env bash
# HERO on tau2-bench: recipes/tau/hero.yaml on one node of 8 GPUs (80 GB), vLLM rollout.
#
#   verl-hindsight prepare-data tau data/tau      # once; the recipe's header has the benchmark's setup
#   bash examples/tau/run_hero.sh [hydra overrides...]
#
# NNODES, N_GPUS, DATA_DIR, MODEL, PROJECT, EXPERIMENT, LOGGER, CHECK_FIT, GPU_MEM, DRY_RUN: examples/run_recipe.sh
exec bash "$(dirname "$0")/../run_recipe.sh" tau hero "$@"
