"""Benchmark adapters: one module per environment, each registered with
:func:`verl_hindsight.environment.register_env` and imported on first use by name (so a benchmark's optional
dependencies are needed only by the users who pick it).

This folder sits at the top of the repository and is installed as ``verl_hindsight.envs``.
"""
