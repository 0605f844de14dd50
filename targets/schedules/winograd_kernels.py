"""The three kernels of a Winograd convolution (winograd.py), as TE computes for
``BlockBuilder.call_te``: FuseOps then fuses the output transform with the
convolution's epilogue (bias, BN scale/shift, residual add, activation).

    winograd_input          V[t, p, c] = (B^T d_p B)[t]       d_p: the zero-padded input tile p
                            in two passes: R = B^T d_p (columns), then V = R B (rows)
    winograd_gemm           M[t, p, f] = sum_c V[t, p, c] * U[t, c, f]
    conv2d_winograd_output  out[n, y, x, f] = (A^T M_p A)[y % m, x % m]
                            in two passes: S = M_p A (rows), then A^T S (columns)

The transforms are written as explicit sums with the matrices' zero terms
dropped, one expression per tile element, chosen by ``if_then_else`` on the
element index: once winograd_schedule.py unrolls that index the choice folds
away and LLVM shares the tile's loads between the elements. Both transforms
are separable and written so, one pass per axis: F(4x4)'s input transform
sums 2 x 6 x 26 = 312 terms per tile and channel, where the 36 double sums
``B[i, eps] B[j, nu] d[i, j]`` have 676; its output transform 6 x 18 + 4 x 18
= 180 per tile and filter, not the 16 double sums' 324 (F(2x2): 64 and 36
terms either way). Of the three
kernel names only the output transform's holds ``conv2d``: fused with the
epilogue (``fused_conv2d_winograd_output_add_relu``) it maps to the Conv node
and its epilogue's nodes as a direct convolution's kernel does (the profiler's
map, edgec/kernels.py); the input transform and the GEMM map to none.
"""

from __future__ import annotations

from edgec.targets.schedules.winograd import WinogradMatrices, tile_counts

INPUT_KERNEL = "winograd_input"
INPUT_COLUMNS = "winograd_input_columns"  # the first pass of the input transform, inside its kernel
GEMM_KERNEL = "winograd_gemm"
OUTPUT_KERNEL = "conv2d_winograd_output"
OUTPUT_ROWS = "winograd_output_rows"  # the first pass of the output transform, inside its kernel


def _weighted_sum(terms):
    """``sum(coefficient * value)`` without multiplies by +-1."""
    total = None
    for coefficient, value in terms:
        if coefficient == 1:
            term = value
        elif coefficient == -1:
            term = -value
        else:
            term = value * float(coefficient)
        total = term if total is None else total + term
    return total


def _select(index, expressions):
    """``expressions[index]`` as nested ``if_then_else`` (folds to one when ``index`` is a constant)."""
    from tvm import te

    chosen = expressions[-1]
    for position in range(len(expressions) - 2, -1, -1):
        chosen = te.if_then_else(index == position, expressions[position], chosen)
    return chosen


def input_transform(data, mats: WinogradMatrices, padding: tuple[int, int, int, int], out_size: tuple[int, int]):
    """``V[eps*alpha + nu, p, c] = sum_j B[j, nu] R[eps, j, p, c]``, ``R[eps, j, p, c] = sum_i B[i, eps]
    d[n, ty*m + i - top, tx*m + j - left, c]`` (NHWC ``data``, zeros outside it),
    ``p = (n*tiles_h + ty)*tiles_w + tx``."""
    from tvm import te, tirx

    batch, height, width, channels = (int(dim) for dim in data.shape)
    m, alpha = mats.m, mats.alpha
    tiles_h, tiles_w = tile_counts(*out_size, m)
    top, left = padding[0], padding[1]
    tiles = batch * tiles_h * tiles_w

    def columns(eps, j, p, c):
        n, ty, tx = p // (tiles_h * tiles_w), p // tiles_w % tiles_h, p % tiles_w

        def load(i):
            y, x = ty * m + (i - top), tx * m + (j - left)
            inside = tirx.all(y >= 0, y < height, x >= 0, x < width)
            return te.if_then_else(inside, data[n, y, x, c], tirx.const(0, data.dtype))

        return _select(eps, [_weighted_sum([(mats.B[i, row], load(i)) for i in range(alpha) if mats.B[i, row] != 0])
                             for row in range(alpha)])

    rows = te.compute((alpha, alpha, tiles, channels), columns, name=INPUT_COLUMNS)

    def compute(t, p, c):
        eps, nu = t // alpha, t % alpha
        return _select(nu, [_weighted_sum([(mats.B[j, col], rows[eps, j, p, c]) for j in range(alpha) if mats.B[j, col] != 0])
                            for col in range(alpha)])

    return te.compute((alpha * alpha, tiles, channels), compute, name=INPUT_KERNEL)


def gemm(transformed_input, transformed_weight):
    """``M[t, p, f] = sum_c V[t, p, c] * U[t, c, f]``."""
    from tvm import te

    _, _, channels = transformed_input.shape
    c = te.reduce_axis((0, channels), name="c")
    shape = (transformed_input.shape[0], transformed_input.shape[1], transformed_weight.shape[2])
    return te.compute(
        shape,
        lambda t, p, f: te.sum(transformed_input[t, p, c] * transformed_weight[t, c, f], axis=c),
        name=GEMM_KERNEL,
    )


def output_transform(products, mats: WinogradMatrices, batch: int, out_size: tuple[int, int]):
    """``out[n, y, x, f] = sum_a A[a, y % m] S[a, x % m, p, f]``, ``S[a, col, p, f] = sum_b A[b, col]
    M[a*alpha + b, p, f]``, ``p = p(n, y // m, x // m)``."""
    from tvm import te

    m, alpha = mats.m, mats.alpha
    out_h, out_w = out_size
    tiles_h, tiles_w = tile_counts(out_h, out_w, m)
    filters = int(products.shape[2])

    def rows(a, col, p, f):
        return _select(col, [_weighted_sum([(mats.A[b, c], products[a * alpha + b, p, f]) for b in range(alpha) if mats.A[b, c] != 0])
                             for c in range(m)])

    reduced = te.compute((alpha, m, batch * tiles_h * tiles_w, filters), rows, name=OUTPUT_ROWS)

    def compute(n, y, x, f):
        p = (n * tiles_h + y // m) * tiles_w + x // m
        return _select(y % m, [_weighted_sum([(mats.A[a, row], reduced[a, x % m, p, f]) for a in range(alpha) if mats.A[a, row] != 0])
                               for row in range(m)])

    return te.compute((batch, out_h, out_w, filters), compute, name=OUTPUT_KERNEL)
