"""Getting a request to a replica: dispatch, router, breakers, bulkheads, retry budget,
back-off."""
