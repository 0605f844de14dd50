"""One kernel-thread count for every runtime a benchmark compares.

TVM's own default on this 2-vCPU VM is one thread (logical CPUs / 2), while
ONNX Runtime and PyTorch use every physical core: without this, edgec would
be timed on half the machine. The scripts pass the count returned here to
every runtime they build (ONNX Runtime sessions included); nothing reads it back.
"""

from __future__ import annotations


def use_threads(threads: int | None) -> int:
    """Configure TVM's thread pool (before it starts) and PyTorch's count; returns the count."""
    import torch

    from edgec.runtimes.local import configure_threads
    from edgec.targets.resolve import physical_cores

    threads = threads or physical_cores()
    configure_threads(threads)
    torch.set_num_threads(threads)
    return threads
