"""Derived columns (achieved FLOP/s, fraction of peak, ours vs the fastest peer) and the markdown table."""

from __future__ import annotations

import numpy as np

from bench.flops import forward_matmul_flops, train_matmul_flops
from bench.models import ModelSpec

MODES = ("forward", "train")


def add_derived(rows: list[dict], model_specs: list[ModelSpec], peak_gflops: float) -> None:
    """Per row and mode: GFLOP/s from the analytic count, the fraction of the sgemm peak, and for
    each framework's 'ours' the ratio to that framework's fastest peer (> 1: ours is faster)."""
    configs = {spec.name: spec.config for spec in model_specs}
    for row in rows:
        cfg = configs[row["model"]]
        per_image = {"forward": forward_matmul_flops(cfg), "train": train_matmul_flops(cfg)}
        for mode in MODES:
            if row[mode]:
                gflops = row[mode]["median"] * per_image[mode] / 1e9
                row[mode] |= {"gflops": gflops, "fraction_of_peak": gflops / peak_gflops}
    for row in rows:
        if row["implementation"] == "ours":
            row["ours_over_fastest_peer"] = {mode: _ratio_to_fastest_peer(row, rows, mode) for mode in MODES}


def _ratio_to_fastest_peer(ours: dict, rows: list[dict], mode: str) -> dict | None:
    """The median over rounds of ours / the peer in the same round (the rounds interleave them),
    against the peer with the highest median rate."""
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
    paired = np.asarray(ours[mode]["rates"]) / np.asarray(fastest[mode]["rates"])
    return {
        "peer": fastest["implementation"],
        "ratio": float(np.median(paired)),
        "min": float(paired.min()),
        "max": float(paired.max()),
    }


def markdown(results: dict) -> str:
    header = (
        "| model | implementation | batch | forward img/s (min–max) | train img/s (min–max) "
        "| forward % of peak | train % of peak | ours / fastest peer (fwd, train) |"
    )
    lines = [header, "|" + "---|" * 8]
    lines += [_table_row(row) for row in results["rows"]]
    sgemm, load = results["sgemm"], results["load_average"]
    peak = (
        f"fp32 matmul peak: {sgemm['peak_gflops']:.1f} GFLOP/s (median of {sgemm['repeats']} "
        f"{sgemm['size']}x{sgemm['size']} sgemms; numpy {sgemm['numpy_gflops']['median']:.1f}, "
        f"torch {sgemm['torch_gflops']['median']:.1f}), measured in this run."
    )
    where = (
        f"Machine: {results['machine']['cpu']}, {results['machine']['usable_cores']} cores. "
        f"Load average (1/5/15 min) before {load['before']}, after {load['after']}."
    )
    how = (
        "Rates are images/s after warm-up: median (min–max, n = repeats); the implementations of a "
        "framework are timed in interleaved rounds, and ours / peer is the median of the per-round ratios. "
        "FLOPs: matmuls only, counted from the config (bench.flops.forward_matmul_flops); "
        "training = 3x forward."
    )
    lines += ["", peak, where, how]
    lines += [f"Note: {note}" for note in results["notes"]]
    return "\n".join(lines) + "\n"


def _table_row(row: dict) -> str:
    ratios = row.get("ours_over_fastest_peer")
    ratio_text = ""
    if ratios:
        has_peer = any(ratios.values())
        ratio_text = ", ".join(_ratio_text(ratios[mode]) for mode in MODES) if has_peer else "no peer"
    return (
        f"| {row['model']} | {row['framework']}: {row['implementation']} | {row['forward']['batch']} "
        f"| {_rate_text(row['forward'])} | {_rate_text(row['train'])} | {_percent(row['forward'])} "
        f"| {_percent(row['train'])} | {ratio_text} |"
    )


def _rate_text(measured: dict | None) -> str:
    if not measured:
        return "—"
    return f"{measured['median']:.1f} ({measured['min']:.1f}–{measured['max']:.1f}, n={measured['repeats']})"


def _percent(measured: dict | None) -> str:
    return f"{100 * measured['fraction_of_peak']:.1f}%" if measured else "—"


def _ratio_text(ratio: dict | None) -> str:
    if not ratio:
        return "—"
    return f"{ratio['ratio']:.2f}x ({ratio['min']:.2f}–{ratio['max']:.2f}) vs {ratio['peer']}"
