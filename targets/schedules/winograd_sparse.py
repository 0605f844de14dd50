"""Graph rewrite: 1xN block-sparse 3x3 stride-1 convolutions become block-sparse Winograd ones.

    edgec_block_sparse_conv(x, values, indices, indptr, bias)
      ->  act(winograd_output(block_sparse_winograd_gemm(winograd_input(x), U, indices, indptr)) + bias)

for the BlockSparseConv kernels (edgec/ops/block_sparse/lowering.py, which records what each
computes on its PrimFunc: ``SparseConvCall``) that are 3x3, stride 1, dilation 1, with at
least one kept block, whose shapes the ``WinogradPolicy`` takes (``density``, the kept
fraction of the blocks, scales its GEMM and direct costs). The input and output transforms
are the dense Winograd convolution's (winograd_kernels.py, scheduled by
winograd_schedule.py); between them the GEMM of each tile element is block-sparse with the
convolution's own CSR pattern and the values ``U = G g G^T`` of each kept block, computed
here, once (winograd.transform_weights on the ``nnz`` blocks as ``nnz`` input channels of N
filters): a pruned block stays pruned, so the GEMM loops over the kept blocks only
(edgec/ops/block_sparse/winograd_gemm.py). The bias and the activation become Relax ops
after the output transform, which FuseOps fuses with them and with what follows (a
residual add, a ReLU), as after a dense Winograd convolution.

Runs in the graph stage with the dense Winograd rewrite (graph.py, step 7), after the layout
pass: the BlockSparseConv kernel is channels-last already, its NCHW wrappers cancel later.
A convolution the policy turns down keeps its direct block-sparse kernel (logged with
``-vv``, the reason named); one the rewrite fails on is recorded as a fallback
(``graph:block-sparse-winograd``) and also keeps it.
"""

from __future__ import annotations

import numpy as np

from edgec.core.fallbacks import FallbackLog
from edgec.targets.schedules.guard import describe_call
from edgec.targets.schedules.te_rewrite import bound_constant, rewrite_module
from edgec.targets.schedules.winograd_graph import OPAQUE, WinogradPolicy, logged_choice

RULE = "graph:block-sparse-winograd"
GEMM_KERNEL = "edgec_block_sparse_winograd_gemm"
OUTPUT_KERNEL = "block_sparse_winograd_output"  # no ``conv2d`` token: the profiler's map keeps it off dense Conv nodes


def ineligible(record) -> str | None:
    """Why the BlockSparseConv ``record`` (a SparseConvCall) cannot run as Winograd, or None."""
    shape = record.shape
    if shape.kernel != (3, 3):
        return f"kernel {shape.kernel[0]}x{shape.kernel[1]}, not 3x3"
    if shape.strides != (1, 1) or shape.dilations != (1, 1):
        return f"strides {list(shape.strides)}, dilations {list(shape.dilations)}: not 1"
    if shape.nnz == 0:
        return "every block pruned"
    return None


def block_sparse_winograd(policy: WinogradPolicy, vector, fallbacks: FallbackLog | None = None):
    """A module pass rewriting the block-sparse convolutions ``policy`` accepts (module docstring);
    ``vector`` (a CpuVector) sizes the GEMM's register tile."""
    import tvm
    from tvm import relax, tirx

    from edgec.ops.block_sparse.lowering import SparseConvCall
    from edgec.ops.block_sparse.winograd_gemm import WinogradGemmShape, winograd_gemm
    from edgec.ops.common import emit_kernel, relax_activation
    from edgec.targets.schedules import winograd_kernels as kernels
    from edgec.targets.schedules.winograd import tile_counts, transform_weights, winograd_matrices

    fallbacks = fallbacks if fallbacks is not None else FallbackLog()
    call_tir = tvm.ir.Op.get("relax.call_tir")

    def decide(call, record) -> int | None:
        m, reason = None, ineligible(record)
        shape = record.shape
        if reason is None:
            density = shape.nnz / (shape.blocks * shape.channels)
            m, reason = policy.choose(shape.batch, shape.out_height, shape.out_width, shape.channels, shape.out_channels,
                                      density)  # fmt: skip
        return logged_choice(call, m, reason, "block-sparse ")

    def winograd(mutator, call, record, m):
        builder, shape = mutator.builder_, record.shape
        x, values, indices, indptr, bias = call.args[1].fields
        values = bound_constant(mutator, values)  # (nnz, 3, 3, N): the lowering's layout
        mats = winograd_matrices(m)
        out_size = (shape.out_height, shape.out_width)
        transform = builder.call_te(lambda data: kernels.input_transform(data, mats, shape.pads, out_size), x,
                                    primfunc_name_hint=kernels.INPUT_KERNEL)  # fmt: skip
        mutator.patterns.append((transform.args[0], OPAQUE))  # a kernel of its own, as in winograd_graph.py
        transformed = builder.emit(transform)
        # the nnz kept blocks as nnz input channels of N filters, HWIO: U is (alpha^2, nnz, N)
        transformed_values = transform_weights(np.ascontiguousarray(values.transpose(1, 2, 0, 3)), m)
        gemm = WinogradGemmShape(mats.alpha**2, shape.batch * int(np.prod(tile_counts(*out_size, m))), shape.channels,
                                 shape.blocks, shape.block_size, shape.nnz)  # fmt: skip
        zeros = relax.const(np.zeros(gemm.filters, np.float32))  # the GEMM's accumulators start at 0: the bias comes later
        products = builder.emit(emit_kernel(
            builder, winograd_gemm(gemm, vector), GEMM_KERNEL, [transformed, relax.const(transformed_values), indices, indptr, zeros],
            relax.TensorType([gemm.elements, gemm.tiles, gemm.filters], "float32"),
        ))  # fmt: skip
        out = builder.emit(builder.call_te(lambda products: kernels.output_transform(products, mats, shape.batch, out_size),
                                           products, primfunc_name_hint=OUTPUT_KERNEL))  # fmt: skip
        biased = builder.emit(relax.op.add(out, bias))
        return relax_activation(biased, record.activation, record.low, record.high)

    @relax.expr_functor.mutator
    class _Rewriter(relax.PyExprMutator):
        def __init__(self, mod):
            super().__init__(mod)
            self.module = mod

        def visit_call_(self, call):
            call = super().visit_call_(call)
            if call.op != call_tir:
                return call
            prim = self.module[call.args[0]]
            record = SparseConvCall.of_kernel(prim) if isinstance(prim, tirx.PrimFunc) else None
            if record is None:
                return call
            m = decide(call, record)
            if m is None:
                return call
            try:
                return winograd(self, call, record, m)
            except Exception as error:  # noqa: BLE001 - keep the direct kernel
                fallbacks.add(describe_call(call), RULE, error, "kept as a direct block-sparse convolution")
                return call

    @tvm.transform.module_pass(opt_level=0, name="EdgecBlockSparseWinograd")
    def _pass(mod, _ctx):
        return rewrite_module(mod, _Rewriter)[0]

    return _pass
