"""Benchmarks: black-box HTTP clients of the gateway and of engines. Import nothing of ours."""
