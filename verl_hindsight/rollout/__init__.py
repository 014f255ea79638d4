"""The ``hf`` rollout backend (transformers, batched, CPU-friendly)."""
