"""Graph rewrite (graph.py step 6c): a float matrix product whose rows or columns tile badly is
computed on zero-padded operands and sliced back:

    matmul(a[..., M, K], b[..., K, N])  ->  strided_slice(matmul(pad(a)[..., M', K], pad(b)[..., K, N']),
                                                          rows [0, M), columns [0, N))

Why: dense.Dense's register tile takes whole divisors of the rows (no tail loops or predicates)
and whole vectors of the columns. A ViT-B/16 has 197 tokens, a prime: every one of its products
ran one row per tile, each weight vector loaded for one multiply-add (its 768 -> 3072 layers at
27 GFLOP/s on one x86 core, one thread), and its attention scores ``q k^T`` have 197 columns,
no whole vector: they ran scalar (2.6 GFLOP/s). Rows are padded when no tile of 4-8 rows divides
them (197 -> 200), columns to whole vectors (197 -> 208), each only where that adds at most
``common.MAX_PADDING_FRACTION``. The zero rows and columns are computed and dropped; the slice
fuses into the product's kernel (FuseOps), the padding of ``a`` into its producer where it can.

Matrix-vector products (fewer than ``MIN_ROWS`` rows) are left to packed_matvec.py (step 6a).
"""

from __future__ import annotations

import logging

import numpy as np

from edgec.core.fallbacks import FallbackLog
from edgec.targets.schedules.common import MAX_PADDING_FRACTION, padded_channels, static_shape
from edgec.targets.schedules.guard import describe_call

log = logging.getLogger(__name__)

RULE = "graph:pad-matmul"
ROW_TILES = range(4, 9)  # row counts of dense.Dense's register tiles that share a weight vector
ROW_MULTIPLES = (8, 4)  # padded row counts, tried in turn
MIN_ROWS = 16


def padded_rows(rows: int) -> int | None:
    """The row count to pad ``rows`` to, or None when a tile of 4-8 rows divides it already, it
    is a matrix-vector product's, or padding would add more than MAX_PADDING_FRACTION."""
    if rows < MIN_ROWS or any(rows % tile == 0 for tile in ROW_TILES):
        return None
    for multiple in ROW_MULTIPLES:
        padded = -(-rows // multiple) * multiple
        if padded - rows <= rows * MAX_PADDING_FRACTION:
            return padded
    return None


def _padded(expr, axis_from_end: int, extra: int):
    """``expr`` with ``extra`` zeros after its axis ``-axis_from_end``: NumPy for a constant."""
    import tvm
    from tvm import relax

    ndim = len(expr.ty.shape)
    widths = [0] * (2 * ndim)
    widths[2 * (ndim - axis_from_end) + 1] = extra
    if isinstance(expr, tvm.ir.expr.Constant):
        value = expr.value.numpy()
        return relax.const(np.pad(value, list(zip(widths[::2], widths[1::2], strict=True))), str(value.dtype))
    return relax.op.nn.pad(expr, widths)


def pad_matmul(lanes: int, fallbacks: FallbackLog | None = None):
    """The Relax function pass described in the module docstring (``lanes``: float32 per vector)."""
    from tvm import relax
    from tvm.relax.dpl import is_op, rewrite_call, wildcard

    product = is_op("relax.matmul")(wildcard(), wildcard())
    fallbacks = fallbacks if fallbacks is not None else FallbackLog()

    def rewriter(expr, matches):
        call = matches[product]
        try:
            rewritten = padded(call)
        except Exception as error:  # noqa: BLE001 - keep the product as it is
            fallbacks.add(describe_call(call), RULE, error, "left unpadded")
            return expr
        return expr if rewritten is None else rewritten

    def padded(call):
        """The padded product, or None to keep ``call``."""
        a, b = call.args
        a_shape, b_shape, out_shape = static_shape(a.ty), static_shape(b.ty), static_shape(call.ty)
        if a_shape is None or b_shape is None or out_shape is None or min(len(a_shape), len(b_shape)) < 2:
            return None
        if {str(a.ty.dtype), str(b.ty.dtype), str(call.ty.dtype)} != {"float32"}:
            return None
        rows, columns = a_shape[-2], b_shape[-1]
        new_rows = padded_rows(rows)
        new_columns = padded_channels(columns, lanes) if rows >= MIN_ROWS else None
        if new_rows is None and new_columns is None:
            return None
        log.debug("matmul %s x %s: rows %d -> %d, columns %d -> %d", a_shape, b_shape, rows, new_rows or rows,
                  columns, new_columns or columns)
        if new_rows is not None:
            a = _padded(a, 2, new_rows - rows)
        if new_columns is not None:
            b = _padded(b, 1, new_columns - columns)
        out = relax.op.matmul(a, b, out_dtype=call.attrs.out_dtype)
        ndim = len(out_shape)
        return relax.op.strided_slice(out, axes=[ndim - 2, ndim - 1], begin=[0, 0], end=[rows, columns])

    @relax.transform.function_pass(opt_level=0, name="EdgecPadMatmul")
    def _pass(func, _mod, _ctx):
        return rewrite_call(product, rewriter, func)

    return _pass
