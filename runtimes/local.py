"""Run a compiled artifact on this machine with TVM's Relax VM (CPU, or GPU 0 for CUDA artifacts)."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence

import numpy as np

from edgec.core.artifact import Artifact
from edgec.core.errors import ArtifactError, InputDataError

log = logging.getLogger(__name__)

THREADS_ENV = "TVM_NUM_THREADS"


def configure_threads(threads: int | None) -> None:
    """Run the kernels of this process (and of processes started from it, such as MetaSchedule's
    runners) on ``threads`` threads; None leaves the default (the CPUs the process may use).

    The one place edgec configures the thread count. The pool that runs a CPU lib.so's parallel
    loops is edgec's own, linked into lib.so (targets/thread_pool.c); it reads
    ``TVM_NUM_THREADS`` at the first parallel kernel of that lib.so, as TVM's pool does at its
    start (``EDGEC_THREAD_POOL=tvm`` runs TVM's instead), so the count is written there; edgec
    never reads it back.
    """
    if threads is not None:
        os.environ[THREADS_ENV] = str(threads)


class LocalRunner:
    """Loads ``lib.so`` once; ``run`` takes and returns NumPy arrays. ``threads``: the kernels'
    thread count (``configure_threads``; None: the pool's default)."""

    def __init__(self, artifact: Artifact, threads: int | None = None):
        import tvm
        from tvm import relax

        configure_threads(threads)
        self.artifact = artifact
        if artifact.manifest["target"].get("arch") == "cuda":
            from edgec.runtimes import cuda

            self.device, module = cuda.load_module(artifact)  # GPU 0; NoCudaDeviceError without one
        elif not artifact.manifest["target"].get("host_runnable", False):
            raise ArtifactError(
                f"artifact '{artifact.path}' was compiled for {artifact.target_name}, which this machine cannot run; "
                "run it on the board (edgec bench --rpc HOST:PORT) or compile for x86"
            )
        else:
            self.device = tvm.cpu()
            module = tvm.runtime.load_module(str(artifact.lib))
        self.vm = relax.VirtualMachine(module, self.device)

    def run(self, inputs: Sequence[np.ndarray]) -> list[np.ndarray]:
        import tvm

        check_inputs(self.artifact, inputs)
        result = self.vm["main"](*(tvm.runtime.tensor(np.require(x, requirements="C"), self.device) for x in inputs))
        return flatten_outputs(result)

    def time_ms(self, inputs: Sequence[np.ndarray], repeat: int = 10, warmup: int = 2) -> list[float]:
        """Per-run latencies in milliseconds, timed by TVM's own timer."""
        import tvm

        self.vm.set_input("main", *(tvm.runtime.tensor(np.require(x, requirements="C"), self.device) for x in inputs))
        timer = self.vm.time_evaluator("invoke_stateful", self.device, number=1, repeat=repeat, min_repeat_ms=0)
        for _ in range(warmup):
            self.vm.invoke_stateful("main")
        return [seconds * 1e3 for seconds in timer("main").results]


def flatten_outputs(result) -> list[np.ndarray]:
    if hasattr(result, "numpy"):
        return [result.numpy()]
    flat: list[np.ndarray] = []
    for item in result:
        flat.extend(flatten_outputs(item))
    return flat


def check_inputs(artifact: Artifact, inputs: Sequence[np.ndarray]) -> None:
    expected = artifact.inputs
    if len(inputs) != len(expected):
        raise InputDataError(f"the model takes {len(expected)} input(s) ({_names(expected)}), got {len(inputs)}")
    for array, spec in zip(inputs, expected, strict=True):
        if list(array.shape) != spec["shape"]:
            raise InputDataError(
                f"input {spec['name']!r} needs shape {tuple(spec['shape'])}, got {tuple(array.shape)}"
            )
        if array.dtype.name != spec["dtype"]:
            raise InputDataError(f"input {spec['name']!r} needs dtype {spec['dtype']}, got {array.dtype.name}")
        check_values(spec, array)


def check_values(spec: dict, array: np.ndarray) -> None:
    """Checks the compiled code does not make: Gather indices in range (InputDataError; out of range
    they read other memory or crash), NaN/Inf in float inputs (a warning: compiled kernels need not
    propagate NaN as ONNX Runtime does, e.g. a ReLU may turn it into 0)."""
    if "index_range" in spec and array.size:
        low, high = spec["index_range"]
        bad = np.flatnonzero((array < low) | (array > high))
        if bad.size:
            where = np.unravel_index(int(bad[0]), array.shape)
            raise InputDataError(
                f"input {spec['name']!r} holds {bad.size} Gather index(es) outside [{low}, {high}], e.g. "
                f"{int(array[where])} at {list(map(int, where))}; the compiled model does not check its indices"
            )
    if np.issubdtype(array.dtype, np.floating):
        special = int(np.count_nonzero(~np.isfinite(array)))
        if special:
            log.warning(
                "input %r holds %d NaN/Inf value(s): compiled kernels do not propagate them as ONNX Runtime does "
                "(a ReLU or max-pool may turn NaN into a number); its outputs are not meaningful",
                spec["name"], special,
            )  # fmt: skip


def _names(specs) -> str:
    return ", ".join(spec["name"] for spec in specs)
