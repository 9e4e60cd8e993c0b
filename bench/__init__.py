"""Throughput benchmark of the vitspec backends against stock peers: `python -m bench.run`."""
