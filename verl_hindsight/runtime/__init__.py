"""Runtime pieces that make stock verl run on a CPU-only machine."""
