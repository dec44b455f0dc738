"""The OpenAI Batch API: files, batches, and the runner that sends a batch's requests
through ``Proxy.handle`` at batch priority, durably (SQLite)."""
