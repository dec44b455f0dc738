"""The use cases, HTTP-free: the proxy, what a request holds (the lease), the contract,
the cache calls, RAG."""
