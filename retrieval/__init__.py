"""Retrieval: a durable docstore, FAISS indexes per collection, and search.

Imports nothing of ``serving``: the gateway hands in an embedding function and a tokenizer.
"""
