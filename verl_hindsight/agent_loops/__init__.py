"""verl agent loops that record per-turn action spans (registered with verl via ``@register``)."""
