"""Graph passes: onnx_ir passes, one class per file, usable alone or via ``-p``.

    from edgec.passes import FoldBatchNormPass
    edgec.apply(model, [FoldBatchNormPass()])

``PASSES`` is the registry ``edgec passes`` lists (see passes/registry.py).
"""

from edgec.passes.fold_batchnorm import FoldBatchNormPass

PASSES: tuple[type, ...] = (FoldBatchNormPass,)

__all__ = ["FoldBatchNormPass", "PASSES"]
