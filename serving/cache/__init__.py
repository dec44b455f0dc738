"""Caching: a prompt-to-response cache and an embedding cache, scoped by tenant."""
