"""The dot-product convolution (dot_graph.py) as a TE compute for ``BlockBuilder.call_te``:

    signed[n, y, x, c]  = x[n, y - top, x - left, c] ^ 0x80 as int8   (uint8 activations; the
                          padding is the input's zero value 0 before the shift, like the
                          explicit zero-point pad qdq_integer.py writes)
    conv2d_nhwc_dot[n, y, x, f] = sum_{ry, rx, g, i} int32(signed[n, y*s + ry*d, x*s + rx*d, 4g + i])
                                                    * int32(P[ry, rx, g, f, i])

The innermost two axes, 4 output channels ``f`` by 4 input channels ``i``, are one ``sdot``
(conv2d_dot.py tensorizes them with TVM's ``dot_4x4_i8i8s32_sdot``: ``C[f] += sum_i A[i] B[f, i]``).
int8 activations are used as they are. Of the two kernel names only the convolution's holds
``conv2d`` (the profiler's map, edgec/kernels.py).
"""

from __future__ import annotations

import dataclasses

GROUP = 4  # input channels per 32-bit lane of sdot: one lane sums 4 products
SHIFT = 128  # uint8 activation codes - SHIFT are int8 (x ^ 0x80)
KERNEL = "conv2d_dot"  # the PrimFunc (fused: fused_conv2d_dot_add_...)
SIGNED = "dot_signed"  # the shifted (and padded) activations, a block of the kernel
ANCHOR = "conv2d_nhwc_dot"  # the reduction block


@dataclasses.dataclass(frozen=True)
class Geometry:
    """The convolution's ``padding`` (top, left, bottom, right), ``strides``, ``dilation`` and
    output ``(height, width)``."""

    padding: tuple[int, int, int, int]
    strides: tuple[int, int]
    dilation: tuple[int, int]
    out_size: tuple[int, int]


def signed_input(data, geometry: Geometry):
    """``signed`` above: the (padded) activations as int8, ``x ^ 0x80`` for uint8 ones."""
    from tvm import te, tirx

    batch, height, width, channels = (int(dim) for dim in data.shape)
    top, left, bottom, right = geometry.padding
    unsigned = str(data.dtype) == "uint8"

    def shifted(n, y, x, c):
        inside = tirx.all(y >= top, y < height + top, x >= left, x < width + left)
        value = te.if_then_else(inside, data[n, y - top, x - left, c], tirx.const(0, data.dtype)) if any(geometry.padding) \
            else data[n, y, x, c]  # fmt: skip
        if unsigned:
            return tirx.reinterpret("int8", tirx.bitwise_xor(value, tirx.const(SHIFT, "uint8")))
        return value

    return te.compute((batch, height + top + bottom, width + left + right, channels), shifted, name=SIGNED)


class Window:
    """A convolution's reduction over the window and groups of input channels of ``packed``
    (``[kh, kw, groups, oc, ...]``): the axes ``ry``, ``rx``, ``group`` and ``pixel``, the shifted
    activation ``signed_input`` reads at an output point and a channel."""

    def __init__(self, data, packed, geometry: Geometry):
        from tvm import te

        self.signed = signed_input(data, geometry)
        kh, kw, groups, self.filters = (int(dim) for dim in packed.shape[:4])
        self.ry = te.reduce_axis((0, kh), name="ry")
        self.rx = te.reduce_axis((0, kw), name="rx")
        self.group = te.reduce_axis((0, groups), name="rg")
        self.geometry = geometry

    def pixel(self, n, y, x, channel):
        (stride_y, stride_x), (dilation_y, dilation_x) = self.geometry.strides, self.geometry.dilation
        return self.signed[n, y * stride_y + self.ry * dilation_y, x * stride_x + self.rx * dilation_x, channel]


def conv2d_dot(data, packed, geometry: Geometry):
    """The compute above: ``data`` NHWC uint8/int8, ``packed`` int8 ``[kh, kw, ic/4, oc, 4]``."""
    from tvm import te

    window = Window(data, packed, geometry)
    lane = te.reduce_axis((0, GROUP), name="ri")
    ry, rx, group = window.ry, window.rx, window.group

    def compute(n, y, x, f):
        pixel = window.pixel(n, y, x, group * GROUP + lane)
        return te.sum(pixel.astype("int32") * packed[ry, rx, group, f, lane].astype("int32"), axis=[ry, rx, group, lane])

    return te.compute((data.shape[0], *geometry.out_size, window.filters), compute, name=ANCHOR)
