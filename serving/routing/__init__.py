"""Getting a request to a replica: dispatch, router, breakers, bulkheads, retry budget.

The dispatcher keeps a ``ServedModel`` per model (``served.py``) and a ``ReplicaLoad``
per replica (``load.py``); the back-off it waits between retries is
``models.engines.backoff``, shared with the engine supervisor."""
