"""One kernel-thread count for every runtime a benchmark compares.

TVM's own default on this 2-vCPU VM is one thread (logical CPUs / 2), while
ONNX Runtime and PyTorch use every physical core: without this, edgec would
be timed on half the machine.
"""

from __future__ import annotations

import os


def use_threads(threads: int | None) -> int:
    """Set TVM_NUM_THREADS (before TVM's thread pool starts) and PyTorch's count; returns the count."""
    import torch

    from edgec.targets.resolve import physical_cores

    threads = threads or physical_cores()
    os.environ["TVM_NUM_THREADS"] = str(threads)
    torch.set_num_threads(threads)
    return threads
