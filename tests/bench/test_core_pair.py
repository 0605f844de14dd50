"""bench/core_pair.py (can two threads run at full speed together?) and how bench/peers.py
uses its verdicts: which rounds count as undisturbed."""

from __future__ import annotations

import importlib.util
import shutil
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    sys.path.insert(0, str(BENCH))  # peers.py imports its siblings (timing, core_pair) by name
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(BENCH))
    return module


core_pair = _load("core_pair")
peers = _load("peers")
needs_cc = pytest.mark.skipif(not (shutil.which("cc") or shutil.which("gcc")), reason="no C compiler")


def test_two_threads_on_one_core_are_shared():
    assert core_pair.CorePair(alone_s=1.0, first_s=1.02, second_s=1.05).shared is False
    assert core_pair.CorePair(alone_s=1.0, first_s=1.0, second_s=1.98).shared is True  # the slower thread counts
    assert core_pair.CorePair(alone_s=2.0, first_s=4.1, second_s=4.0).slowdown == pytest.approx(2.05)


@needs_cc
def test_probe_builds_once_named_by_its_source_and_measures(tmp_path):
    library = core_pair.build(cache=tmp_path)
    assert library.parent == tmp_path and library.name.startswith("core_pair-") and library.suffix == ".so"
    stamp = library.stat().st_mtime_ns
    assert core_pair.build(cache=tmp_path) == library and library.stat().st_mtime_ns == stamp  # cached
    assert sorted(tmp_path.iterdir()) == [library]  # no build directory left behind
    probe = core_pair.measure(steps=1000, rounds=3)
    assert probe.alone_s > 0 and probe.first_s > 0 and probe.second_s > 0


@needs_cc
def test_a_source_that_does_not_build_leaves_no_library(tmp_path):
    source = tmp_path / "broken.c"
    source.write_text("int core_pair_seconds(long steps, int rounds, double *seconds) { return }\n")
    cache = tmp_path / "cache"
    with pytest.raises(core_pair.ProbeUnavailable, match="could not build broken.c"):
        core_pair.build(source, cache)
    assert list(cache.glob("*.so")) == [] and list(cache.iterdir()) == []


class _Runtime:
    """A peers.Worker stand-in: fixed latencies, no process."""

    def __init__(self, runtime: str, ms: list[float]):
        self.runtime, self.ms = runtime, iter(ms)
        self.status, self.valid = "ok", True
        self.samples, self.round_medians, self.round_disturbed = [], [], []

    def run(self, count: int) -> list[float]:
        return [next(self.ms)] * count if count != 3 else [0.0] * 3  # 3: time_rounds' warm-up


def test_a_block_is_disturbed_by_the_probe_before_or_after_it(monkeypatch):
    monkeypatch.setattr(peers, "PAUSE_S", 0.0)
    workers = [_Runtime("edgec", [1.0, 1.0]), _Runtime("ort", [2.0, 2.0]), _Runtime("openvino", [3.0, 3.0])]
    # probes in order: before edgec, before ort, before openvino, after the round; twice
    verdicts = iter([False, True, False, False, False, False, False, True])
    probe = lambda: core_pair.CorePair(1.0, 1.0, 2.0 if next(verdicts) else 1.0)  # noqa: E731
    peers.time_rounds(workers, rounds=2, repeat=2, label="test", probe=probe)
    assert [w.round_disturbed for w in workers] == [[True, False], [True, False], [False, True]]
    assert [w.round_medians for w in workers] == [[1.0, 1.0], [2.0, 2.0], [3.0, 3.0]]


def test_the_undisturbed_ratio_counts_only_rounds_no_block_was_disturbed():
    edgec, ort, openvino = _Runtime("edgec", []), _Runtime("ort", []), _Runtime("openvino", [])
    edgec.round_medians, ort.round_medians, openvino.round_medians = [2.0, 1.0, 1.0], [1.0, 2.0, 1.0], [4.0, 4.0, 4.0]
    edgec.round_disturbed, ort.round_disturbed, openvino.round_disturbed = [True, False, False], [False] * 3, [False, False, True]
    assert peers.best_peer_ratio([edgec, ort, openvino]) == (1.0, "ort", 3)  # ratios 2.0, 0.5, 1.0
    assert peers.best_peer_ratio([edgec, ort, openvino], undisturbed=True) == (0.5, "ort", 1)
    openvino.round_disturbed = [False, True, True]
    assert peers.best_peer_ratio([edgec, ort, openvino], undisturbed=True) is None
