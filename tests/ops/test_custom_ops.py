"""The custom-op plumbing: registry -> NumPy reference (onnx ReferenceEvaluator)
-> Relax lowering as an opaque, pre-scheduled call_tir -> compiled and verified."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper
from onnx.reference.op_run import OpRun

import edgec
from edgec.core.errors import UnsupportedOpError
from edgec.ops import CUSTOM_OPS, DOMAIN, CustomOp, register
from edgec.ops.common import constant, emit_kernel, tensor_type
from edgec.runtimes.reference import reference_outputs


class ChannelScale(OpRun):
    op_domain = DOMAIN

    def _run(self, x, scale):
        return (x * scale.reshape(1, -1, 1, 1),)


def lower_channel_scale(bb, inputs, attrs, target):
    from tvm import relax, te

    x, scale_expr = inputs
    scale = constant(scale_expr, "ChannelScale's scale")
    shape, _dtype = tensor_type(x)
    data = te.placeholder(shape, "float32", name="x")
    weight = te.placeholder((shape[1],), "float32", name="scale")
    out = te.compute(shape, lambda n, c, h, w: data[n, c, h, w] * weight[c], name="scaled")
    prim = te.create_prim_func([data, weight, out])
    return emit_kernel(bb, prim, "edgec_channel_scale", [x, relax.const(scale)], relax.TensorType(shape, "float32"))


@pytest.fixture()
def channel_scale_op():
    op = register(CustomOp("ChannelScale", ChannelScale, lower_channel_scale, "test op"))
    yield op
    del CUSTOM_OPS["ChannelScale"]


def _model() -> ir.Model:
    rng = np.random.default_rng(0)
    scale = helper.make_tensor("scale", TensorProto.FLOAT, [4], rng.uniform(0.5, 2, 4).astype(np.float32))
    weight = helper.make_tensor("w", TensorProto.FLOAT, [4, 3, 1, 1], rng.standard_normal(12).astype(np.float32))
    graph = helper.make_graph(
        [
            helper.make_node("Conv", ["x", "w"], ["c"], name="conv"),
            helper.make_node("ChannelScale", ["c", "scale"], ["s"], name="scale_node", domain=DOMAIN),
            helper.make_node("Relu", ["s"], ["y"], name="relu"),
        ],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 8, 8])],
        [scale, weight],
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(DOMAIN, 1)])
    proto.ir_version = 8
    return ir.serde.deserialize_model(proto)


def test_reference_runs_custom_ops(channel_scale_op):
    graph = _model()
    x = np.random.default_rng(1).standard_normal((1, 3, 8, 8)).astype(np.float32)
    (y,) = reference_outputs(graph, [x])
    weight = graph.graph.initializers["w"].const_value.numpy()[:, :, 0, 0]
    scale = graph.graph.initializers["scale"].const_value.numpy()
    expected = np.maximum(np.einsum("oc,nchw->nohw", weight, x) * scale.reshape(1, -1, 1, 1), 0)
    np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-6)


def test_custom_op_compiles_and_verifies(channel_scale_op, tmp_path):
    model = edgec.from_onnx_ir(_model())
    result = edgec.compile(model, "x86", tmp_path / "a")
    verification = result.manifest["verification"]
    assert verification["status"] == "passed"
    assert "onnxruntime" not in verification  # ORT cannot run custom ops: the NumPy reference did
    assert verification["numpy"]["max_abs"] < 1e-5 and verification["numpy"]["enforced"]
    kernels = [call["kernel"] for call in result.manifest["kernels"]]
    assert "edgec_channel_scale" in kernels  # opaque: not fused into the conv or relu kernels


def test_unknown_custom_op_is_refused_before_build(tmp_path):
    model = edgec.from_onnx_ir(_model())  # ChannelScale not registered here
    with pytest.raises(UnsupportedOpError, match="edgec.ChannelScale"):
        edgec.compile(model, "x86", tmp_path / "a")
    assert not (tmp_path / "a").exists()
