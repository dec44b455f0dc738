"""Retrieval: FAISS indexes, the docstore and RAG context building (issue 8).

Nothing is served from here yet; the package exists so the layout is in place.
"""
