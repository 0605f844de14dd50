"""Graph passes: onnx_ir passes, one class per file, usable alone or via ``-p``.

    from edgec.passes import FoldBatchNormPass
    edgec.apply(model, [FoldBatchNormPass()])

``PASSES`` is the registry ``edgec passes`` lists (see passes/registry.py).
"""

from edgec.passes.fold_batchnorm import FoldBatchNormPass
from edgec.passes.fuse_filters import FuseFiltersPass
from edgec.passes.remove_zero_channels import RemoveZeroChannelsPass
from edgec.passes.pack_block_sparse import PackBlockSparsePass
from edgec.passes.lower_binary import LowerBinaryPass
from edgec.passes.lower_ternary import LowerTernaryPass
from edgec.passes.quantize_int8 import QuantizeInt8Pass

PASSES: tuple[type, ...] = (
    FoldBatchNormPass,
    FuseFiltersPass,
    RemoveZeroChannelsPass,
    PackBlockSparsePass,
    LowerBinaryPass,
    LowerTernaryPass,
    QuantizeInt8Pass,
)

__all__ = [
    "FoldBatchNormPass",
    "FuseFiltersPass",
    "RemoveZeroChannelsPass",
    "PackBlockSparsePass",
    "LowerBinaryPass",
    "LowerTernaryPass",
    "QuantizeInt8Pass",
    "PASSES",
]
