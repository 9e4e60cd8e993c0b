"""Peer ViTs written the way other codebases write them, for the benchmark and the export tests."""
