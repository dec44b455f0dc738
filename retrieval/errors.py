"""Errors raised by the ``retrieval`` package.

The tree::

    RetrievalError              retrieval could not do what was asked (e.g. the embedding
    │                           model returned a wrong number of vectors)
    ├── InvalidName             a collection name breaks the naming rule
    ├── CollectionNotFound      no such collection for this tenant (another tenant's is
    │                           not found either)
    ├── CollectionExists        a collection by that name exists already
    ├── DocumentNotFound        no document by that id in the collection
    ├── StoreUnavailable        the docstore's database cannot be reached right now
    ├── ShardUnavailable        no index worker answered for a shard of the collection
    └── WorkerUnauthenticated   a call to an index worker without the gateways' shared
                                token (``retrieval.worker_token``)

``retrieval`` imports nothing of ``serving``; ``serving.errors`` maps these to HTTP in its
one table. Errors of the embedding function handed in (the gateway's model errors) pass
through unchanged.
"""

from __future__ import annotations


class RetrievalError(Exception):
    """Base of every error raised by ``retrieval``."""


class InvalidName(RetrievalError):
    pass


class CollectionNotFound(RetrievalError):
    pass


class CollectionExists(RetrievalError):
    pass


class DocumentNotFound(RetrievalError):
    pass


class StoreUnavailable(RetrievalError):
    pass


class ShardUnavailable(RetrievalError):
    pass


class WorkerUnauthenticated(RetrievalError):
    pass
