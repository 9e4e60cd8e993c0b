"""bench.step_profile: every kernel of a step lands in a kind, and the matmuls are found."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from tests.test_cli import ROOT


@pytest.mark.parametrize("framework", ["torch", "flax"])
def test_the_profile_finds_the_matmuls_and_sums_the_shares_to_one(framework):
    run = subprocess.run(
        [sys.executable, "-m", "bench.step_profile", "--framework", framework, "--quick", "--model", "tiny"]
        + ["--steps", "2", "--implementations", "ours"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=600,
    )
    assert run.returncode == 0, run.stderr
    (line,) = [line for line in run.stdout.splitlines() if line.startswith("ours:")]
    shares = {
        kind.strip(): int(share) for kind, share in re.findall(r"([a-zA-Z/ ]+) [\d.]+ \((\d+)%\)", line)
    }
    assert shares["matmul"] > 0, line
    assert abs(sum(shares.values()) - 100) <= len(shares), line  # each share is rounded


def test_an_unknown_implementation_is_one_error():
    run = subprocess.run(
        [sys.executable, "-m", "bench.step_profile", "--framework", "torch", "--implementations", "nope"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=600,
    )
    assert run.returncode == 2 and run.stderr.startswith("error: --implementations nope"), run.stderr
