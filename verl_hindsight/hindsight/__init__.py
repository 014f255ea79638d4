"""The hindsight stage: feedback sources, target selection, analyzer/reflector, teacher sequences."""
