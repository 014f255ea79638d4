"""The CPU demo: a hint-following warm start of the tiny model, then GRPO, HINT-SD and SERL side by side."""
