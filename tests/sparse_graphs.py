"""Graphs of edgec's block-sparse ops for tests: random 1xN packed weights, a BlockSparseConv
model beside its dense Conv equivalent (tests/ops, tests/targets)."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from onnx import TensorProto, helper, numpy_helper

from edgec.ops import DOMAIN
from edgec.ops.block_sparse.format import unpack_blocks


def random_blocks(rng, out_channels: int, in_channels: int, n: int, kernel=(1, 1), keep: float = 0.4):
    """Packed arrays of a random 1xN block-sparse weight (about ``keep`` of the blocks kept)."""
    mask = rng.random((out_channels // n, in_channels)) < keep
    indptr = np.concatenate([[0], np.cumsum(mask.sum(1))]).astype(np.int32)
    indices = np.nonzero(mask)[1].astype(np.int32)
    values = rng.standard_normal((indices.size, n, *kernel)).astype(np.float32)
    return values, indices, indptr


def graph(nodes, inputs, outputs, initializers) -> ir.Model:
    proto = helper.make_model(
        helper.make_graph(nodes, "g", inputs, outputs, initializers),
        opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(DOMAIN, 1)],
    )
    proto.ir_version = 8
    return ir.serde.deserialize_model(proto)


def tensor(name: str, shape) -> object:
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, list(shape))


def block_sparse_conv(name: str, source: str, arrays, **attrs):
    """(a BlockSparseConv node ``source`` -> ``name``, its initializers ``{name}_v``, ``_i``, ``_p``,
    ``_b``) from ``arrays`` = (values, indices, indptr, bias); N and the window from the values'
    shape, ``attrs`` the node's others (strides, pads, activation, ...)."""
    values = arrays[0]
    names = [f"{name}_{kind}" for kind in "vipb"]
    initializers = [numpy_helper.from_array(array, each) for array, each in zip(arrays, names, strict=True)]
    node = helper.make_node("BlockSparseConv", [source, *names], [name], domain=DOMAIN, block_size=values.shape[1],
                            kernel_shape=list(values.shape[2:]), **attrs)  # fmt: skip
    return node, initializers


def conv_models(x_shape, out_channels, n, kernel, strides, pads, dilations, activation, seed=0):
    """(sparse, dense) graphs of the same function: BlockSparseConv vs Conv + bias + activation."""
    rng = np.random.default_rng(seed)
    values, indices, indptr = random_blocks(rng, out_channels, x_shape[1], n, kernel)
    bias = rng.standard_normal(out_channels).astype(np.float32)
    weight = unpack_blocks(values, indices, indptr, x_shape[1])
    attrs = {"kernel_shape": list(kernel), "strides": list(strides), "pads": list(pads), "dilations": list(dilations)}
    act_attrs = {"activation_min": 0.0, "activation_max": 6.0} if activation == "Clip" else {}
    sparse_inits = [numpy_helper.from_array(a, name) for a, name in ((values, "v"), (indices, "i"), (indptr, "p"), (bias, "b"))]
    sparse = helper.make_node(
        "BlockSparseConv", ["x", "v", "i", "p", "b"], ["y"], domain=DOMAIN, block_size=n, activation=activation, **attrs, **act_attrs
    )
    out_h = (x_shape[2] + pads[0] + pads[2] - (kernel[0] - 1) * dilations[0] - 1) // strides[0] + 1
    out_w = (x_shape[3] + pads[1] + pads[3] - (kernel[1] - 1) * dilations[1] - 1) // strides[1] + 1
    y = tensor("y", (x_shape[0], out_channels, out_h, out_w))
    dense_inits = [numpy_helper.from_array(weight, "w"), numpy_helper.from_array(bias, "b")]
    dense_nodes = [helper.make_node("Conv", ["x", "w", "b"], ["c" if activation != "none" else "y"], **attrs)]
    if activation == "Relu":
        dense_nodes.append(helper.make_node("Relu", ["c"], ["y"]))
    elif activation == "Clip":
        dense_inits += [numpy_helper.from_array(np.float32(0), "lo"), numpy_helper.from_array(np.float32(6), "hi")]
        dense_nodes.append(helper.make_node("Clip", ["c", "lo", "hi"], ["y"]))
    return (
        graph([sparse], [tensor("x", x_shape)], [y], sparse_inits),
        graph(dense_nodes, [tensor("x", x_shape)], [y], dense_inits),
    )
