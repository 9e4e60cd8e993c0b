"""Derived columns (achieved FLOP/s, fraction of the peak measured in the same round, ours vs the
fastest peer with its spread) and the markdown report."""

from __future__ import annotations

import numpy as np

from bench.flops import forward_matmul_flops, train_matmul_flops
from bench.models import ModelSpec

MODES = ("forward", "train")

# A ratio row whose per-round ours / peer ratios spread wider than this, (max - min) / median, is
# "too noisy to rank". Chosen from the spreads measured on the 2-core development machine quiet and
# with a one-core busy loop beside it: bench/PERFORMANCE.md, "Reading a run on a busy host".
NOISE_THRESHOLD = 0.25


def spread(values) -> float:
    """(max - min) / median: how far apart the rounds are, relative to what is reported."""
    values = np.asarray(values, dtype=float)
    return float((values.max() - values.min()) / np.median(values))


def too_noisy(values, threshold: float = NOISE_THRESHOLD) -> bool:
    return spread(values) > threshold


def fraction_of_peak(rates, peaks_gflops, flops_per_image: int) -> dict:
    """Each round's achieved GFLOP/s over the sgemm peak bracketing that round's turn; the median is
    what is reported. Above 1 the row is impossible (the implementation cannot outrun the matmul
    peak with matmuls): the peak was mis-measured or the load changed within the round."""
    fractions = np.asarray(rates) * flops_per_image / 1e9 / np.asarray(peaks_gflops)
    median = float(np.median(fractions))
    return {
        "fraction_of_peak": median,
        "fraction_of_peak_min": float(fractions.min()),
        "fraction_of_peak_max": float(fractions.max()),
        "fraction_of_peak_rounds": [float(f) for f in fractions],
        "exceeds_peak": median > 1.0,
    }


def add_derived(rows: list[dict], model_specs: list[ModelSpec]) -> None:
    """Per row and mode: GFLOP/s from the analytic count, the fraction of the sgemm peak measured in
    the same rounds, and for each framework's 'ours' the ratio to that framework's fastest peer
    (> 1: ours is faster) with its spread and whether that spread is too wide to rank."""
    configs = {spec.name: spec.config for spec in model_specs}
    for row in rows:
        cfg = configs[row["model"]]
        per_image = {"forward": forward_matmul_flops(cfg), "train": train_matmul_flops(cfg)}
        for mode in MODES:
            if row[mode]:
                row[mode]["gflops"] = row[mode]["median"] * per_image[mode] / 1e9
                row[mode] |= fraction_of_peak(row[mode]["rates"], row[mode]["peak_gflops"], per_image[mode])
    for row in rows:
        if row["implementation"] == "ours":
            row["ours_over_fastest_peer"] = {mode: _ratio_to_fastest_peer(row, rows, mode) for mode in MODES}


def paired_ratio(ours_rates, peer_rates, threshold: float = NOISE_THRESHOLD) -> dict:
    """The per-round ratios ours / peer (the rounds interleave them): median, min, max, spread and
    whether the spread is past the threshold."""
    paired = np.asarray(ours_rates, dtype=float) / np.asarray(peer_rates, dtype=float)
    return {
        "ratio": float(np.median(paired)),
        "min": float(paired.min()),
        "max": float(paired.max()),
        "rounds": [float(r) for r in paired],
        "spread": spread(paired),
        "too_noisy": too_noisy(paired, threshold),
    }


def _ratio_to_fastest_peer(ours: dict, rows: list[dict], mode: str) -> dict | None:
    """Against the peer with the highest median rate."""
    peers = [
        r
        for r in rows
        if r["model"] == ours["model"]
        and r["framework"] == ours["framework"]
        and r["implementation"] != "ours"
        and r[mode]
    ]
    if not peers or not ours[mode]:
        return None
    fastest = max(peers, key=lambda r: r[mode]["median"])
    return {"peer": fastest["implementation"]} | paired_ratio(ours[mode]["rates"], fastest[mode]["rates"])


def header(results: dict) -> list[str]:
    """Where and how it ran: CPU, ISA (and what caps it), threads, load, the in-round peaks."""
    m, load = results["machine"], results["load_average"]
    threads = m["threads"]
    lines = [
        f"# bench.run{' --quick' if results['quick'] else ''}",
        "",
        f"- Machine: {m['cpu']}, {m['usable_cores']} usable of {m['logical_cores']} logical cores.",
        f"- ISA: {m['isa']['level'] or 'unknown'} (cpuinfo flags: {' '.join(m['isa']['flags']) or 'none'})"
        + (f"; torch dispatches {threads['torch']['torch_cpu_capability']}" if "torch" in threads else "")
        + "; caps set: "
        + _env_text(m["isa_env"])
        + ".",
        "- Threads: " + "; ".join(_threads_text(f, t) for f, t in threads.items()) + "; env: "
        f"{_env_text(m['thread_env'])}.",
        f"- Load average (1/5/15 min): before {load['before']}, after {load['after']}.",
    ]
    for framework, sgemm in results["sgemm"].items():
        lines.append(
            f"- fp32 sgemm peak, {framework} (measured in the rounds: {sgemm['matmuls_per_burst']} "
            f"{sgemm['size']}x{sgemm['size']} matmuls before and after each implementation's turn): "
            f"{sgemm['median']:.1f} GFLOP/s median ({sgemm['min']:.1f}–{sgemm['max']:.1f}, n={sgemm['n']})."
        )
    return lines + [""]


def _env_text(env: dict) -> str:
    found = [f"{name}={value}" for name, value in env.items() if value is not None]
    return ", ".join(found) if found else f"none of {', '.join(env)}"


def _threads_text(framework: str, threads: dict) -> str:
    if framework == "torch":
        return f"torch intra-op {threads['torch_intra_op']}, inter-op {threads['torch_inter_op']}"
    if framework == "flax":
        return f"XLA/Eigen intra-op {threads['xla_eigen_intra_op']}"
    if framework == "numpy":
        return f"numpy BLAS {threads.get('numpy_blas')}"
    return f"{framework} {threads}"


def markdown(results: dict) -> str:
    table = (
        "| model | implementation | batch | forward img/s (min–max) | train img/s (min–max) "
        "| forward % of peak (rounds) | train % of peak (rounds) | ours / fastest peer (fwd; train) |"
    )
    lines = header(results) + [table, "|" + "---|" * 8]
    lines += [_table_row(row) for row in results["rows"]]
    how = (
        "Rates are images/s after warm-up: median (min–max, n = rounds); the implementations of a "
        "framework are timed in interleaved rounds. % of peak: each round's achieved matmul FLOP/s over "
        "the sgemm peak measured just before and after that turn (the higher of the two), median "
        "(min–max) over rounds; a median above 100% is impossible and is flagged, not reported. "
        "Ours / peer: the median of the per-round ratios (min–max); a row whose spread "
        f"(max - min) / median exceeds {NOISE_THRESHOLD:.0%} is marked too noisy to rank. "
        "FLOPs: matmuls only, counted from the config (bench.flops.forward_matmul_flops); "
        "training = 3x forward."
    )
    lines += ["", how]
    lines += [f"Note: {note}" for note in results["notes"]]
    return "\n".join(lines) + "\n"


def _table_row(row: dict) -> str:
    return (
        f"| {row['model']} | {row['framework']}: {row['implementation']} | {row['forward']['batch']} "
        f"| {rate_text(row['forward'])} | {rate_text(row['train'])} | {percent_text(row['forward'])} "
        f"| {percent_text(row['train'])} | {peer_ratios_text(row)} |"
    )


def peer_ratios_text(row: dict) -> str:
    """An 'ours' row's ratios to its fastest peer, forward; train ('' for a peer's row)."""
    ratios = row.get("ours_over_fastest_peer")
    if not ratios:
        return ""
    if not any(ratios.values()):
        return "no peer"
    return "; ".join(ratio_text(ratios[mode]) for mode in MODES)


def rate_text(measured: dict | None) -> str:
    if not measured:
        return "—"
    return f"{measured['median']:.1f} ({measured['min']:.1f}–{measured['max']:.1f}, n={measured['repeats']})"


def percent_text(measured: dict | None) -> str:
    if not measured:
        return "—"
    rounds = f"{100 * measured['fraction_of_peak_min']:.0f}–{100 * measured['fraction_of_peak_max']:.0f}"
    if measured["exceeds_peak"]:
        return f"IMPOSSIBLE: {100 * measured['fraction_of_peak']:.0f}% > peak ({rounds})"
    return f"{100 * measured['fraction_of_peak']:.1f}% ({rounds})"


def ratio_text(ratio: dict | None) -> str:
    if not ratio:
        return "—"
    text = (
        f"{ratio['ratio']:.2f}x ({ratio['min']:.2f}–{ratio['max']:.2f}, spread {ratio['spread']:.0%}) "
        f"vs {ratio['peer']}"
    )
    return f"TOO NOISY TO RANK: {text}" if ratio["too_noisy"] else text
