"""Interleaved timing for the benchmark scripts: every variant is timed in every round
(in a shuffled order when a seed is given), so that load from other processes on a
shared machine hits each variant alike; ratios are taken within one run."""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Mapping

Timer = Callable[[], list[float]]  # one round of a variant: its timed runs, in milliseconds


def interleave(timers: Mapping[str, Timer], rounds: int, shuffle_seed: int | None = None) -> dict[str, list[float]]:
    """All samples (ms) per timer after ``rounds`` rounds; each round calls every timer once,
    in the given order, or shuffled per round with ``random.Random(shuffle_seed)``."""
    order = list(timers)
    rng = random.Random(shuffle_seed) if shuffle_seed is not None else None
    samples: dict[str, list[float]] = {name: [] for name in order}
    for _ in range(rounds):
        if rng is not None:
            rng.shuffle(order)
        for name in order:
            samples[name].extend(timers[name]())
    return samples


def onnxruntime_timer(session, feed: dict, repeat: int, warmup: int = 2) -> Timer:
    """A timer of ``repeat`` ONNX Runtime runs of ``session`` on ``feed`` (wall clock), warmed up now."""
    for _ in range(warmup):
        session.run(None, feed)

    def run() -> list[float]:
        times = []
        for _ in range(repeat):
            start = time.perf_counter()
            session.run(None, feed)
            times.append((time.perf_counter() - start) * 1e3)
        return times

    return run


def edgec_timer(runner, inputs: list, repeat: int, warmup: int = 2) -> Timer:
    """A timer of ``repeat`` runs of a LocalRunner, timed by TVM's own timer."""
    return lambda: runner.time_ms(inputs, repeat=repeat, warmup=warmup)


def publish(text: str, output, json_path, raw: dict | None) -> None:
    """Print the report; also write it to ``output`` and the raw samples to ``json_path`` when given."""
    import json

    print(text)
    if output:
        output.write_text(text + "\n")
    if json_path and raw is not None:
        json_path.write_text(json.dumps(raw, indent=1))
