"""Small generated tasks used by the CPU path (smoke runs, tests, benchmarks)."""
