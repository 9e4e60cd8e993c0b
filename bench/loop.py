"""The training loop against its bare step: `python -m bench.loop [--backends torch flax] [--model fmnist-s]`.

Flags it does not know (e.g. `--model-overrides`, `--validation-size`) go to the training parser.

Does the data pipeline keep up? Each round runs `--steps` steps of vitspec.app.training's own epoch
loop (prefetched batches of the real dataset with the recipe's augmentation, the schedule, the
progress bookkeeping), then `--steps` bare training steps on one fixed batch, synchronized at the
end. The loop's images/s over the bare step's, median over the rounds, should be >= 0.95.
The rounds alternate so that a change in the machine's load lands on both.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from vitspec.app import pipeline
from vitspec.app.training import cli, loop, setup
from vitspec.app.training.state import RunState

BACKENDS = ("torch", "flax")


def parse_args(argv: Sequence[str] | None) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(prog="python -m bench.loop", description=__doc__.splitlines()[0])
    parser.add_argument("--backends", nargs="+", choices=list(BACKENDS), default=list(BACKENDS))
    parser.add_argument("--dataset", default="fashion-mnist")
    parser.add_argument("--data-dir", type=Path, default=None)
    parser.add_argument("--model", default="fmnist-s")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=20, help="steps per round and side")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--out", type=Path, default=Path("runs/bench"))
    return parser.parse_known_args(argv)


def measure(backend_name: str, args: argparse.Namespace, training_flags: list[str]) -> dict:
    flags = [
        "--dataset",
        args.dataset,
        "--model",
        args.model,
        "--batch-size",
        str(args.batch_size),
        "--precision",
        "fp32",
        *training_flags,
    ] + (["--data-dir", str(args.data_dir)] if args.data_dir else [])
    config = cli.config_of(cli.build_parser("bench.loop", backend_name).parse_args(flags))
    run = setup.setup(config, Path("runs/bench/loop"), backend_name)
    backend, state = setup.start(run, resume=False)
    train_set = run.dataset.train
    stream = pipeline.train_batches(
        train_set.images, train_set.labels, args.batch_size, state.loader, run.augmentation
    )
    fixed = next(
        pipeline.train_batches(
            train_set.images,
            train_set.labels,
            args.batch_size,
            pipeline.LoaderState(seed=1),
            run.augmentation,
        )
    )
    loop_rates, bare_rates = [], []
    with pipeline.Prefetcher(stream) as batches:
        for _ in range(args.rounds + 1):  # round 0 is warm-up (jit compiles, thread pools)
            loop_rates.append(_loop_rate(run, backend, batches, state, args.steps))
            bare_rates.append(_bare_rate(backend, fixed, args.steps))
    loop_rates, bare_rates = loop_rates[1:], bare_rates[1:]
    ratios = np.asarray(loop_rates) / np.asarray(bare_rates)
    return {
        "backend": backend_name,
        "model": args.model,
        "batch": args.batch_size,
        "steps_per_round": args.steps,
        "loop_images_per_second": loop_rates,
        "bare_images_per_second": bare_rates,
        "loop_over_bare": {
            "median": float(np.median(ratios)),
            "min": float(ratios.min()),
            "max": float(ratios.max()),
        },
    }


def _loop_rate(run: setup.Run, backend, batches, state: RunState, steps: int) -> float:
    """Images/s of `steps` steps of the training loop, by its own clock (state.progress)."""
    seen, seconds = state.progress.seen, state.progress.seconds  # a round ends early at an epoch's end
    loop.train_epoch_steps(run, backend, batches, state, stop_step=state.step + steps)
    return (state.progress.seen - seen) / (state.progress.seconds - seconds)


def _bare_rate(backend, batch: pipeline.TrainBatch, steps: int) -> float:
    start = time.perf_counter()
    for _ in range(steps):
        loss, _ = backend.train_step(batch.images, batch.labels, 1e-4)
    float(loss)  # waits for an asynchronous backend's last step
    return steps * len(batch.labels) / (time.perf_counter() - start)


def main(argv: Sequence[str] | None = None) -> list[dict]:
    args, training_flags = parse_args(argv)
    results = [measure(name, args, training_flags) for name in args.backends]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "loop_results.json").write_text(json.dumps(results, indent=1))
    print(
        f"| backend | model | batch | loop img/s (median) | bare step img/s (median) | loop / bare "
        f"(median, min–max over {args.rounds} rounds of {args.steps} steps) |"
    )
    print("|---|---|---|---|---|---|")
    for r in results:
        ratio = r["loop_over_bare"]
        print(
            f"| {r['backend']} | {r['model']} | {r['batch']} | {np.median(r['loop_images_per_second']):.1f} "
            f"| {np.median(r['bare_images_per_second']):.1f} | {ratio['median']:.3f} "
            f"({ratio['min']:.3f}–{ratio['max']:.3f}) |"
        )
    return results


if __name__ == "__main__":
    main()
