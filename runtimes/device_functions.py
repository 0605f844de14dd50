"""Functions edgec registers on a device (the Python RPC server and, in C++, the native agent).

    edgec.device.info()                              -> JSON string: agent, version, machine, cpu_arch, num_cores,
                                                        emulated, emulated_cpu, counts_instructions
    edgec.profile.register_kernel(module, kernel, global_name)
        makes ``module``'s kernel (found through its imports) a global function on
        the device, so that TVM's own ``runtime.RPCTimeEvaluator`` can time it there.
    edgec.device.cuda()                              -> JSON string: {"ok": true, name, arch, ...} or
        {"ok": false, "reason": ...}; loads TVM's CUDA runtime on first call
        (runtimes/cuda.py). Python server only: the native agent runs no CUDA.
    edgec.device.count_evaluator(module, name, number, repeat) -> f(*args) -> JSON string
        like the time evaluator, but counts guest instructions (runtimes/guest_counter.py);
        only under qemu-user with edgec's counting plugin.

All are tiny on purpose: all timing is TVM's time evaluator, on the device.
"""

from __future__ import annotations

import json
import os
import platform

from edgec.runtimes import guest_counter

AGENT_VERSION = "0.1.0"
EMULATED_ENV = "EDGEC_EMULATED"
EMULATED_CPU_ENV = "EDGEC_EMULATED_CPU"  # qemu's -cpu, set by runtimes/emulate.py

_CPU_ARCH = {"x86_64": "x86_64", "amd64": "x86_64", "aarch64": "aarch64", "arm64": "aarch64"}


def cpu_arch(machine: str) -> str:
    """Map ``uname -m`` to the artifact's ``cpu_arch`` (armv7l/armv8l 32-bit -> armv7)."""
    lowered = machine.lower()
    if lowered.startswith("arm") and lowered not in _CPU_ARCH:
        return "armv7"
    return _CPU_ARCH.get(lowered, lowered)


def device_info() -> str:
    machine = platform.machine()
    return json.dumps(
        {
            "agent": "edgec-python-server",
            "version": AGENT_VERSION,
            "machine": machine,
            "cpu_arch": cpu_arch(machine),
            "num_cores": os.cpu_count() or 1,
            "emulated": os.environ.get(EMULATED_ENV, "") == "1",
            "emulated_cpu": os.environ.get(EMULATED_CPU_ENV) or None,
            "counts_instructions": guest_counter.read_counts() is not None,
        }
    )


def register_kernel(module, kernel: str, global_name: str) -> None:
    import tvm

    function = module.get_function(kernel, query_imports=True)
    tvm.register_global_func(global_name, function, override=True)


def count_evaluator(module, name: str, number: int, repeat: int):
    import tvm

    function = module.get_function(name, query_imports=True) if module is not None else tvm.get_global_func(name)
    return guest_counter.count_evaluator(function, number, repeat)


def register() -> None:
    """Register the device functions in this process (a server's init callback)."""
    import tvm

    tvm.register_global_func("edgec.device.info", device_info, override=True)
    tvm.register_global_func("edgec.profile.register_kernel", register_kernel, override=True)
    tvm.register_global_func("edgec.device.cuda", cuda_info, override=True)
    tvm.register_global_func("edgec.device.count_evaluator", count_evaluator, override=True)


def cuda_info() -> str:
    from edgec.runtimes.cuda import gpu_info_json

    return gpu_info_json()
