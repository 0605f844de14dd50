"""int32 indices for the kernels Relax legalizes (aarch64, x86): a pipeline stage right after legalize.

edgec/build.py runs ``narrow_indices_pass`` where ``narrows_indices(preset)``, before the tuning
database and the schedule rules; ``edgec tune`` extracts its tasks after it (edgec/build.py
``kernel_passes``), so what tune records is what compile looks up.
"""

from __future__ import annotations

from edgec.targets.schedules.common import is_scheduled

__all__ = ["INT32_ELEMENTS", "narrow_indices", "narrow_indices_pass", "narrows_indices"]

INT32_ELEMENTS = 2**31 - 1


def narrows_indices(preset) -> bool:
    """Whether the pipeline for ``preset`` narrows its kernels (``narrow_indices_pass``) before
    the rules: aarch64 and x86, where it was measured to help (``narrow_indices``); not armv7."""
    return preset.kind == "llvm" and preset.cpu_arch in ("aarch64", "x86_64")


def narrow_indices_pass():
    """A module pass giving every not-yet-scheduled PrimFunc int32 indices (``narrow_indices``).
    A pipeline stage right after legalize (edgec/build.py): the rules, the tuning database and
    ``edgec tune`` all see the same kernels."""
    import tvm
    from tvm import tirx

    @tvm.transform.module_pass(opt_level=0, name="EdgecNarrowIndices")
    def _pass(mod, _ctx):
        updates = {}
        for gvar, func in mod.functions_items():
            if isinstance(func, tirx.PrimFunc) and not is_scheduled(func):
                narrowed = narrow_indices(func)
                if not narrowed.same_as(func):
                    updates[gvar] = narrowed
        for gvar, func in updates.items():
            mod[gvar] = func
        return mod

    return _pass



def narrow_indices(func):
    """``func`` with int32 loops and index arithmetic (TVM's ForceNarrowIndexToInt32) when every
    buffer it takes has static shapes of fewer than 2**31 elements; else ``func`` unchanged.

    Relax legalizes kernels with int64 shapes. TVM's default TIR pipeline narrows them to int32
    itself (NarrowDataType, right before LoopPartition), but it rebuilds the loops without their
    annotations: the ``pragma_loop_partition_hint`` of the depthwise, pooling and padding
    schedules was dropped on every model kernel (the tests' TE kernels, int32 from the start,
    kept it), and the border tests stayed in the interior loads. Narrowed before scheduling,
    the hints reach LoopPartition (MobileNetV2 on cortex-a53: the 3x3/2 stem with its padded
    copy 5.03M -> 4.19M instructions, the 56x56x144 depthwise layer 2.44M -> 2.27M). Only
    where that was measured to help: on cortex-a7 the partitioned depthwise layers ran more
    instructions (MobileNetV2 252.6M -> 257.4M). On x86 (AVX-512) the few-channel copy of a stem's
    padded RGB input was a loop of masked ``vgatherqps`` with its border test (MobileNetV3-small's
    stem kernel 0.17-0.21 -> 0.13 ms alone), and end to end, interleaved on one core: MobileNetV3-small
    0.96x, ShuffleNetV2 x0.5 0.95x, MNASNet 0.5 0.98x, the other peer models 0.99-1.00x.
    ``narrows_indices`` says aarch64 and x86."""
    import tvm
    from tvm import tirx

    for param in func.params:
        buffer = func.buffer_map.get(param) if hasattr(func, "buffer_map") else None
        shape = buffer.shape if buffer is not None else getattr(getattr(param, "ty", None), "shape", None)
        if shape is None:
            continue
        if not all(isinstance(dim, tirx.IntImm) for dim in shape):
            return func
        elements = 1
        for dim in shape:
            elements *= int(dim)
        if elements > INT32_ELEMENTS:
            return func
    return tirx.transform.ForceNarrowIndexToInt32()(tvm.IRModule({"main": func}))["main"]
