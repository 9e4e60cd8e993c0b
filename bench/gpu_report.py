"""The markdown report of `bench.run --device gpu`: the device, the matmul peaks measured in the
rounds, and one row per implementation and variant with the attention kernels it ran."""

from __future__ import annotations

from bench.report import NOISE_THRESHOLD, peer_ratios_text, percent_text, rate_text

PRECISION_TEXT = {
    "bf16": "bfloat16 with float32 parameters (the training backends' default on a GPU: torch autocast, "
    "flax modules in bfloat16), peers likewise",
    "fp32": "float32",
}


def header(results: dict) -> list[str]:
    flags = "".join(f" --{flag.replace('_', '-')}" for flag in ("quick", "dry_run") if results[flag])
    lines = [f"# bench.run --device gpu{flags}", ""]
    if results["dry_run"]:
        lines += [
            "Dry run: the GPU half's code on the CPU, in float32, on tiny models. It checks the machinery; "
            "its numbers say nothing about a GPU.",
            "",
        ]
    machine, load, precision = results["machine"], results["load_average"], results["measured_against"]
    versions = ", ".join(f"{name} {version}" for name, version in machine["versions"].items() if version)
    lines += [f"- Device, {framework}: {_device_text(gpu)}." for framework, gpu in machine["gpu"].items()]
    lines += [
        f"- Host: {machine['cpu']}, {machine['usable_cores']} usable cores; load average (1/5/15 min) "
        f"before {load['before']}, after {load['after']}.",
        f"- Versions: {versions}.",
        f"- Rows run in {PRECISION_TEXT[precision]}; % of peak is against the {precision} burst.",
    ]
    for framework, peaks in results["peaks"].items():
        for dtype, peak in peaks.items():
            lines.append(
                f"- {dtype} matmul peak, {framework} (in the rounds: {peak['matmuls_per_burst']} "
                f"{peak['size']}x{peak['size']} products before and after each turn"
                f"{_fp32_setting(machine['gpu'][framework]) if dtype == 'fp32' else ''}): "
                f"{_tflops(peak['median'])} TFLOP/s median ({_tflops(peak['min'])}–{_tflops(peak['max'])}, "
                f"n={peak['n']})."
            )
    return lines + [""]


def _device_text(gpu: dict) -> str:
    if "capability" in gpu:  # torch's
        if gpu["capability"] is None:
            return gpu["device"]
        major, minor = gpu["capability"]
        return (
            f"{gpu['device']} (compute capability {major}.{minor}, CUDA {gpu['cuda']}, cuDNN {gpu['cudnn']})"
        )
    return f"{gpu['device']} ({', '.join(gpu['devices'])})"


def _fp32_setting(gpu: dict) -> str:
    if "float32_matmul_precision" in gpu:
        return f"; torch float32_matmul_precision {gpu['float32_matmul_precision']!r}"
    return f"; jax default_matmul_precision {gpu['default_matmul_precision']!r}, XLA's default when None"


def _tflops(gflops: float) -> str:
    return f"{gflops / 1000:.3g}"


def markdown(results: dict) -> str:
    precision = results["measured_against"]
    table = (
        "| model | implementation (variant) | attention kernel (fwd; train) | batch x calls a turn "
        "| first forward + step, s "
        f"| forward img/s (min–max) | train img/s (min–max) | forward % of {precision} peak (rounds) "
        f"| train % of {precision} peak (rounds) | ours / fastest peer (fwd; train) |"
    )
    lines = header(results) + [table, "|" + "---|" * 10]
    lines += [_table_row(row) for row in results["rows"]]
    how = (
        "Rates are images/s after warm-up: median (min–max, n = rounds). A turn is `calls` forwards or "
        "training steps, then a wait for the device; the implementations of a framework take turns in "
        "interleaved, rotated rounds, after one forward and one step (timed: the compiles, torch.compile's "
        "or XLA's) and a warm-up turn. A forward returns the logits to the host (an evaluation's work); a "
        "training step is left queued until the turn's wait. Ours takes uint8 images from the host and "
        "normalizes them on the device every step; the peers' float32 images are on the device already. "
        "Peers train with torch's fused AdamW (torch) or optax.adamw (flax). % of peak: each turn's "
        "matmul FLOP/s (bench.flops, training = 3x forward) over the higher of the bursts just before and "
        "after it. Attention kernel: for torch, the ATen op SDPA dispatched to (torch's profiler); for "
        "ours in flax, what XLA compiled jax.nn.dot_product_attention to on these shapes ('explicit': the "
        "module's einsum + softmax path). Ours / peer: the median of per-round ratios; a spread "
        f"(max - min) / median past {NOISE_THRESHOLD:.0%} is marked too noisy to rank."
    )
    lines += ["", how]
    lines += [f"Note: {note}" for note in results["notes"]]
    return "\n".join(lines) + "\n"


def _table_row(row: dict) -> str:
    attention = row["attention"]
    same = attention["forward"] == attention["train"]
    attention_text = attention["forward"] if same else f"{attention['forward']}; {attention['train']}"
    return (
        f"| {row['model']} | {row['framework']}: {row['implementation']} ({row['variant']}) "
        f"| {attention_text} | {row['forward']['batch']} x {row['calls_per_turn']} "
        f"| {row['first_call_seconds']:.1f} "
        f"| {rate_text(row['forward'])} | {rate_text(row['train'])} "
        f"| {percent_text(row['forward'])} | {percent_text(row['train'])} | {peer_ratios_text(row)} |"
    )
