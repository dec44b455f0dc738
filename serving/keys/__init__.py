"""API keys: records, stores (Redis or a local file) and key generation.

Only a key's sha256 is stored; the secret is shown once, when it is created. A key's
``id`` (the first 12 hex digits of its hash) is what lists, logs and the admin API use.
"""
