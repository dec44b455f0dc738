"""The gateway: an OpenAI-compatible contract layer in front of vLLM engines.

- ``settings``: the one root settings object (``weir.toml`` + ``WEIR_*`` variables).
- ``app``: ``create_app(settings)``, the FastAPI application and its lifespan.
- ``routes/``: thin HTTP routers, one per resource.
- ``protocol/``: the pydantic wire models (imports nothing but pydantic).
- ``proxy``: the use case: resolve the model, pick a replica, call it, clean the answer.
- ``responses``: makes engine JSON conform to OpenAI's published schemas.
- ``streaming``: SSE framing; every stream ends in ``[DONE]`` or an error event.
- ``errors``: gateway errors and the one table from error to HTTP status.
- ``middleware``: request ids and API keys as pure ASGI middleware.
- ``cli``: the ``weir`` command.
"""
