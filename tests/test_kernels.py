"""edgec/kernels.py: the kernel table's best-effort map from kernels to the ONNX nodes they compute
(what `edgec profile` prints beside each kernel and takes the MACs per kernel from)."""

from __future__ import annotations

import onnx_ir as ir
from onnx import helper

from edgec.kernels import attach_onnx_nodes


def _graph(op_types: list[str]) -> ir.Model:
    """A chain of nodes named ``{op}{index}`` (inputs unconnected: only the order matters here)."""
    nodes = [helper.make_node(op, [f"t{index}"], [f"t{index + 1}"], name=f"{op}{index}") for index, op in enumerate(op_types)]
    graph = helper.make_graph(nodes, "g", [], [])
    return ir.serde.deserialize_model(helper.make_model(graph))


def test_an_int8_epilogue_does_not_take_the_next_convolution():
    """An int8 kernel's requantization adds (add, cast, multiply, maximum, minimum, add, cast) name
    the ``add`` a Conv also lowers to: the next Conv stayed with the kernel before (its MACs counted
    twice, the next kernel's row empty). A Conv goes to a kernel that names ``conv2d`` only."""
    graph = _graph(["QuantizeLinear", "DequantizeLinear", "Conv", "Clip", "QuantizeLinear", "DequantizeLinear",
                    "Conv", "Clip", "QuantizeLinear", "DequantizeLinear", "Conv", "Add", "QuantizeLinear"])  # fmt: skip
    calls = [
        {"kernel": "fused_conv2d_pair1_add7_cast6_multiply2_maximum2_minimum3_add8_cast7_add9_cast8"},
        {"kernel": "fused_conv2d3_add16_cast16_multiply6_maximum5_minimum6_add17_cast17_add18_cast18"},
        {"kernel": "fused_cast15_subtract_cast12_multiply5_conv2d_nhwc_int8_dot4_add19_add20_cast21"},
    ]
    attach_onnx_nodes(calls, graph)
    assert [call["onnx_nodes"] for call in calls] == [["Conv2", "Clip3"], ["Conv6", "Clip7"], ["Conv10", "Add11"]]


def test_float_kernels_keep_their_bias_and_residual_adds():
    graph = _graph(["Conv", "Relu", "Conv", "Add", "Relu", "GlobalAveragePool", "Flatten", "Gemm"])
    calls = [{"kernel": name} for name in ("fused_conv2d_add_relu", "fused_conv2d1_add1_add2_relu1", "mean",
                                           "fused_matmul_packed_add3")]  # fmt: skip
    attach_onnx_nodes(calls, graph)
    assert [call["onnx_nodes"] for call in calls] == [
        ["Conv0", "Relu1"], ["Conv2", "Add3", "Relu4"], ["GlobalAveragePool5"], ["Gemm7"],
    ]


def test_profile_rate_of_a_kernel_without_a_flop_estimate_comes_from_its_macs():
    """TIR's FLOP estimate is 0 for kernels built on tensor intrinsics (the int8 dot and pair
    products): the row's GFLOP/s is then 2 x its ONNX nodes' MACs per second, not 0."""
    from edgec.runtimes.profile import KernelRow

    estimated = KernelRow("k", ["Conv0"], "", calls=1, ms_per_call=0.5, flops_per_call=3e6, macs_per_call=1_000_000)
    intrinsic = KernelRow("k", ["Conv0"], "", calls=1, ms_per_call=0.5, flops_per_call=0.0, macs_per_call=1_000_000)
    unknown = KernelRow("k", [], "", calls=1, ms_per_call=0.5, flops_per_call=0.0)
    assert estimated.gflops == 6.0 and intrinsic.gflops == 4.0 and unknown.gflops == 0.0


def test_a_convolution_takes_the_add_only_when_it_has_a_bias():
    """A BatchNormalization whose scale the graph stage folded into the weights leaves one ``add``
    after a bias-free Conv: it is the batch norm's, so both go to that kernel; a Conv with a bias
    input takes its own ``add``."""
    nodes = [
        helper.make_node("Conv", ["x", "w0"], ["c0"], name="Conv0"),
        helper.make_node("BatchNormalization", ["c0", "g", "b", "m", "v"], ["n0"], name="BN1"),
        helper.make_node("Clip", ["n0"], ["r0"], name="Clip2"),
        helper.make_node("Conv", ["r0", "w1", "b1"], ["c1"], name="Conv3"),
        helper.make_node("Add", ["c1", "r0"], ["y"], name="Add4"),
    ]
    graph = ir.serde.deserialize_model(helper.make_model(helper.make_graph(nodes, "g", [], [])))
    calls = [{"kernel": "fused_conv2d_add_maximum_minimum"}, {"kernel": "fused_conv2d1_add1_add2"}]
    attach_onnx_nodes(calls, graph)
    assert [call["onnx_nodes"] for call in calls] == [["Conv0", "BN1", "Clip2"], ["Conv3", "Add4"]]
