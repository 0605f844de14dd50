"""Where a compiled artifact runs: this process, or a board over TVM RPC.

A :class:`Device` hides the difference: it uploads and loads ``lib.so``,
makes tensors on the device, and times functions with TVM's time evaluator
*on the device*. Every RPC failure becomes a DeviceError that names the
device and the step, and every wait is bounded.
"""

from __future__ import annotations

import contextlib
import json
import logging
import socket
import threading
from collections.abc import Iterator
from typing import Any

import numpy as np

from edgec.core.artifact import Artifact
from edgec.core.errors import ArtifactError, DeviceError
from edgec.runtimes import device_functions

log = logging.getLogger(__name__)

RPC_SESS_MASK = 128  # TVM encodes remote devices as type + 128 * (session index + 1)


class Device:
    """Common interface of LocalDevice and RemoteDevice."""

    label = "device"
    info: dict[str, Any]

    @property
    def emulated(self) -> bool:
        return bool(self.info.get("emulated"))

    def check_artifact(self, artifact: Artifact) -> None:
        """Refuse an artifact built for another CPU architecture than the device's; for a
        CUDA artifact, find the device's GPU (NoCudaDeviceError without one) and run there."""
        wanted = artifact.manifest["target"]["cpu_arch"]
        have = self.info.get("cpu_arch")
        if artifact.manifest["target"]["arch"] == "cuda":
            self.use_gpu(artifact)
        if wanted != have:
            raise ArtifactError(
                f"artifact '{artifact.path}' was compiled for {artifact.target_name} ({wanted}), but {self.label} is "
                f"{have} ({self.info.get('machine')}); compile for a matching target (see `edgec targets`)"
            )

    def use_gpu(self, artifact: Artifact) -> None:
        """Make GPU 0 the device that tensors, runs and timers use, or raise NoCudaDeviceError."""
        raise NotImplementedError

    def _gpu_found(self, gpu: dict[str, Any], artifact: Artifact) -> None:
        from edgec.runtimes import cuda

        cuda.check_arch(artifact.manifest["target"]["tvm"]["arch"], gpu, f"artifact '{artifact.path}'")
        self.info = {**self.info, "gpu": gpu}
        self.label = f"{self.label}, GPU 0 {gpu['name']} ({gpu['arch']})"

    @contextlib.contextmanager
    def step(self, what: str) -> Iterator[None]:
        """Turn TVM/RPC failures during ``what`` into a DeviceError naming the device."""
        try:
            yield
        except (DeviceError, ArtifactError):
            raise
        except Exception as error:  # noqa: BLE001 - TVM raises RPCError, TVMError, OSError...
            text = str(error).strip().splitlines()
            raise DeviceError(f"{self.label}: {what} failed: {text[-1] if text else type(error).__name__}") from error

    def close(self) -> None:
        """Release the session."""

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class LocalDevice(Device):
    """This machine, in this process; ``threads``: the kernels' thread count (None: lib.so's pool's default,
    TVM_NUM_THREADS else the CPUs this process may use)."""

    label = "local (this machine)"

    def __init__(self, threads: int | None = None) -> None:
        import tvm

        from edgec.runtimes.local import configure_threads

        configure_threads(threads)
        self.info = {**json.loads(device_functions.device_info()), "agent": "edgec (in-process)"}
        self.dev = tvm.cpu()

    def use_gpu(self, artifact: Artifact) -> None:
        import tvm

        from edgec.runtimes import cuda

        self._gpu_found(cuda.gpu().as_dict(), artifact)
        self.dev = tvm.cuda(0)

    def load(self, artifact: Artifact):
        import tvm

        from edgec.runtimes import cuda

        with self.step("loading lib.so"):
            if artifact.manifest["target"]["arch"] == "cuda":
                return cuda.load_module(artifact)[1]
            return tvm.runtime.load_module(str(artifact.lib))

    def tensor(self, array: np.ndarray):
        import tvm

        return tvm.runtime.tensor(np.require(array, requirements="C"), self.dev)

    def register_kernel(self, module, kernel: str, global_name: str) -> None:
        device_functions.register_kernel(module, kernel, global_name)

    def evaluator(self):
        import tvm

        return tvm.get_global_func("runtime.RPCTimeEvaluator")

    def device_type_on_device(self) -> int:
        return self.dev.dlpack_device_type()

    def count_evaluator(self):
        return device_functions.count_evaluator


class RemoteDevice(Device):
    """A board (or an emulated one) reached over TVM RPC."""

    def __init__(self, session, label: str) -> None:
        self.session = session
        self.label = label
        with self.step("asking the device what it is (edgec.device.info)"):
            try:
                info = session.get_function("edgec.device.info")
            except Exception as error:  # noqa: BLE001
                raise DeviceError(
                    f"{label} is a TVM RPC server without edgec's device functions; "
                    "start it with `edgec device serve` or the edgec-agent"
                ) from error
            self.info = json.loads(info())
        self.dev = session.cpu()

    def use_gpu(self, artifact: Artifact) -> None:
        from edgec.core.errors import NoCudaDeviceError

        with self.step("asking the device for its GPU (edgec.device.cuda)"):
            try:
                probe = self.session.get_function("edgec.device.cuda")
            except Exception:  # noqa: BLE001 - TVM raises when the server lacks the function
                raise NoCudaDeviceError(
                    f"{self.label} runs no CUDA (its server has no edgec.device.cuda: an edgec-agent or an older "
                    "edgec); start `edgec device serve` on the GPU machine"
                ) from None
            info = json.loads(probe())
        if not info.pop("ok"):
            raise NoCudaDeviceError(f"{self.label}: {info['reason'].removeprefix('no CUDA device: ')}")
        self._gpu_found(info, artifact)
        self.dev = self.session.cuda(0)

    def load(self, artifact: Artifact):
        from edgec.runtimes import cuda

        kernels = cuda.artifact_kernels(artifact.path) if artifact.manifest["target"]["arch"] == "cuda" else None
        with self.step("uploading lib.so"):
            self.session.upload(str(artifact.lib), "edgec_model.so")
            if kernels is not None:  # the server's kernel compiler serves it (runtimes/cuda.py)
                key = cuda.source_key(kernels[0])
                self.session.upload(str(artifact.path / cuda.KERNELS_BINARY), f"{cuda.RPC_KERNELS_PREFIX}{key}.fatbin")
        with self.step("loading lib.so on the device"):
            return self.session.load_module("edgec_model.so")

    def tensor(self, array: np.ndarray):
        import tvm

        return tvm.runtime.tensor(np.require(array, requirements="C"), self.dev)

    def register_kernel(self, module, kernel: str, global_name: str) -> None:
        self.session.get_function("edgec.profile.register_kernel")(module, kernel, global_name)

    def evaluator(self):
        return self.session.get_function("runtime.RPCTimeEvaluator")

    def count_evaluator(self):
        """The device's edgec.device.count_evaluator (an emulated board's; see runtimes/icount.py)."""
        return self.session.get_function("edgec.device.count_evaluator")

    def device_type_on_device(self) -> int:
        """The device type as the board sees it (without the client's RPC session mask)."""
        return self.dev.dlpack_device_type() % RPC_SESS_MASK

    def close(self) -> None:
        """End the RPC session, so that the board (which serves one session at a time) is free again.

        TVM has no explicit close: the session ends when its last reference
        goes, and ``session.cpu()`` devices hold one (``dev._rpc_sess``).
        """
        import gc

        self.session = None
        self.dev = None
        gc.collect()


def parse_address(text: str, what: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise DeviceError(f"bad {what} address {text!r}: write HOST:PORT, e.g. 127.0.0.1:9090")
    if not 0 < int(port) < 65536:
        raise DeviceError(f"bad {what} address {text!r}: port {int(port)} is not a TCP port (1-65535)")
    return host, int(port)


def _bounded(call, seconds: float, what: str):
    """Run ``call`` in a daemon thread; DeviceError if it takes longer than ``seconds``."""
    result: dict[str, Any] = {}

    def target() -> None:
        try:
            result["value"] = call()
        except BaseException as error:  # noqa: BLE001 - handed to the caller
            result["error"] = error

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        raise DeviceError(f"{what}: no answer within {seconds:g} s")
    if "error" in result:
        raise result["error"]
    return result["value"]


def connect(rpc: str | None = None, tracker: str | None = None, key: str | None = None, timeout: float = 60.0,
            threads: int | None = None) -> Device:
    """A LocalDevice (running kernels on ``threads`` threads), or a RemoteDevice reached directly
    (``rpc``) or through a tracker (the board keeps its own thread count)."""
    if rpc and tracker:
        raise DeviceError("give either --rpc HOST:PORT or --tracker HOST:PORT --key KEY, not both")
    if not timeout > 0:
        raise DeviceError(f"--timeout must be a positive number of seconds, not {timeout:g}")
    if tracker and not key:
        raise DeviceError("--tracker needs --key (the device key the board registered with, e.g. a7)")
    if not rpc and not tracker:
        return LocalDevice(threads)
    from tvm import rpc as tvm_rpc

    if rpc:
        host, port = parse_address(rpc, "--rpc")
        label = f"device at {host}:{port}"
        try:
            session = _bounded(lambda: tvm_rpc.connect(host, port, session_timeout=0), timeout, f"connecting to {label}")
        except DeviceError:
            raise
        except Exception as error:  # noqa: BLE001 - TVM's InternalError on refused connections
            raise DeviceError(f"cannot connect to {label} ({_last(error)}); is `edgec device serve` or the agent running?") from None
        return RemoteDevice(session, label)
    host, port = parse_address(tracker, "--tracker")
    label = f"device '{key}' from tracker {host}:{port}"
    _probe(host, port, f"tracker at {host}:{port}", timeout)
    try:
        client = _bounded(lambda: tvm_rpc.connect_tracker(host, port), timeout, f"connecting to tracker {host}:{port}")
        summary = _bounded(client.summary, timeout, f"asking tracker {host}:{port} for its boards")
    except DeviceError:
        raise
    except Exception as error:  # noqa: BLE001
        raise DeviceError(f"tracker {host}:{port} did not answer: {_last(error)}") from None
    queue = summary.get("queue_info", {})
    if key not in queue:
        known = ", ".join(sorted(queue)) or "none"
        raise DeviceError(f"tracker {host}:{port} has no board registered with key {key!r} (keys: {known})")
    try:
        session = _bounded(
            lambda: client.request(key, max_retry=1),
            timeout,
            f"waiting for a free board with key {key!r} at tracker {host}:{port} (all busy?)",
        )
    except DeviceError:
        raise
    except Exception as error:  # noqa: BLE001
        raise DeviceError(f"tracker {host}:{port} could not give a board with key {key!r}: {_last(error)}") from None
    return RemoteDevice(session, label)


def _last(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return lines[-1] if lines else type(error).__name__


def _probe(host: str, port: int, label: str, timeout: float) -> None:
    try:
        with socket.create_connection((host, port), timeout=min(timeout, 10.0)):
            pass
    except OSError as error:
        raise DeviceError(f"cannot reach {label}: {error.strerror or error}; is the server running?") from None
