"""bench/timing.py: every variant timed in every round, in a shuffled order when seeded."""

from __future__ import annotations

import importlib.util
from pathlib import Path

_SPEC = importlib.util.spec_from_file_location("bench_timing", Path(__file__).resolve().parents[2] / "bench" / "timing.py")
timing = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(timing)
interleave, onnxruntime_timer = timing.interleave, timing.onnxruntime_timer


def _recording(calls: list[str], name: str, value: float):
    def run() -> list[float]:
        calls.append(name)
        return [value, value + 1]

    return run


def test_interleave_times_every_variant_every_round():
    calls: list[str] = []
    timers = {name: _recording(calls, name, float(index)) for index, name in enumerate("abc")}
    samples = interleave(timers, rounds=3)
    assert calls == list("abc") * 3  # no seed: the given order
    assert samples == {"a": [0.0, 1.0] * 3, "b": [1.0, 2.0] * 3, "c": [2.0, 3.0] * 3}


def test_seeded_interleave_shuffles_each_round_reproducibly():
    orders = []
    for _ in range(2):
        calls: list[str] = []
        interleave({name: _recording(calls, name, 0.0) for name in "abcdef"}, rounds=4, shuffle_seed=7)
        orders.append(calls)
    assert orders[0] == orders[1]
    rounds = [orders[0][i : i + 6] for i in range(0, 24, 6)]
    assert all(sorted(block) == list("abcdef") for block in rounds)
    assert len({tuple(block) for block in rounds}) > 1


def test_onnxruntime_timer_warms_up_then_times_each_run():
    class Session:
        runs = 0

        def run(self, _outputs, _feed):
            Session.runs += 1

    timer = onnxruntime_timer(Session(), {}, repeat=4, warmup=2)
    assert Session.runs == 2
    times = timer()
    assert len(times) == 4 and all(t >= 0 for t in times) and Session.runs == 6
