"""verl-hindsight: hindsight distillation for multi-turn LLM agents, as a plugin for verl.

Importing this package does nothing heavy; verl loads ``verl_hindsight.register`` through its ``verl.plugins``
entry point.
"""

__version__ = "0.1.0"
