"""What a run leaves behind, made readable: summary table, PNG curves, self-contained HTML trajectory viewer."""
