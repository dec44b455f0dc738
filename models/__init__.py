"""Model store, registry and engine lifecycle.

- ``config``: the registry's configuration objects (models, versions, store, engines).
- ``catalog``: where each pullable default model comes from.
- ``store``: pull, convert and verify weights in a local store outside the repo.
- ``registry``: public names, aliases and versions resolved to what serves them.
- ``engine_client``: the one adapter that speaks HTTP to a vLLM replica.
- ``supervisor``: starts, restarts and stops one local engine process.
- ``fleet``: every replica of every model version, with health checks.
- ``errors``: the exception tree of this package.
"""
