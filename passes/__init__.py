"""Graph passes: onnx_ir passes, one class per file, usable alone or via ``-p``.

    from edgec.passes import FoldBatchNormPass
    edgec.apply(model, [FoldBatchNormPass()])

``PASSES`` is the registry ``edgec passes`` lists (see passes/registry.py).
"""

PASSES: tuple[type, ...] = ()

__all__ = ["PASSES"]
