"""Peer ViTs written the way other codebases write them, for the benchmark only."""
