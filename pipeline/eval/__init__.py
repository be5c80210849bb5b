"""Tiny-world evaluators: identity embedder and attribute classifier."""
