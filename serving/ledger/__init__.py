"""The usage ledger: one row per finished request, written off the hot path to SQL."""
