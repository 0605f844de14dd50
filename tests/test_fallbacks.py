"""No schedule rule or graph rewrite fails a build (issue 11).

Each test forces one part of edgec's pipeline to fail, compiles a small model
for x86 and checks that the build falls back for that kernel or op only, that
the fallback is recorded in the manifest (``schedules.fallbacks``), that the
rest is still scheduled by the library, and that the compiled outputs still
match ONNX Runtime (the compiler's own verification, rtol = atol = 1e-4, plus a
second run here). Also: the constant-folding stage, the layout pass on ops
TVM's ConvertLayout cannot convert, and errors that name the ONNX node.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnx_ir as ir
import pytest
import torch
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper
from torch import nn

import edgec
from edgec.cli import cli
from edgec.core.fold import fold_constants
from edgec.runtimes.local import LocalRunner
from edgec.runtimes.reference import run_onnxruntime
from edgec.targets import schedules
from edgec.targets.schedules import graph as graph_rewrites
from edgec.targets.schedules.common import Rule
from edgec.targets.schedules.conv2d import Conv2DNHWC

RTOL = ATOL = 1e-4
SHAPE = (1, 3, 16, 16)


class SmallNet(nn.Module):
    """Conv-BN-ReLU, conv, flatten, dense: one kernel per rule family."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.Conv2d(16, 16, 3))
        self.classifier = nn.Linear(16 * 14 * 14, 10)

    def forward(self, x):
        return self.classifier(torch.flatten(self.features(x), 1))


@pytest.fixture(scope="module")
def small_net(tmp_path_factory):
    torch.manual_seed(0)
    net = SmallNet().eval()
    with torch.no_grad():
        net.features[1].running_mean.uniform_(-0.5, 0.5)
        net.features[1].running_var.uniform_(0.5, 2.0)
    path = tmp_path_factory.mktemp("small") / "net.pt"
    torch.jit.save(torch.jit.script(net), str(path))
    return path


def compile_small(path, output):
    # direct convolutions only: the 16 -> 16 one would be a Winograd one (its fallbacks: test_winograd.py)
    result = edgec.compile(edgec.load(path, input_shape=SHAPE), "x86", output, winograd=None)
    assert result.manifest["verification"]["status"] == "passed"
    assert result.manifest["verification"]["onnxruntime"]["within_tolerance"] is True
    x = np.random.default_rng(3).standard_normal(SHAPE).astype(np.float32)
    got = LocalRunner(result.artifact).run([x])
    want = run_onnxruntime(ir.load(str(result.artifact.onnx)), [x])
    np.testing.assert_allclose(got[0], want[0], rtol=RTOL, atol=ATOL)
    return result.manifest


def rules_of(manifest) -> dict[str, str | None]:
    return {call["kernel"]: call.get("schedule") for call in manifest["kernels"]}


def test_a_rule_that_raises_falls_back_for_its_kernels_only(small_net, tmp_path, monkeypatch, caplog):
    library = Conv2DNHWC.apply

    def refuse(self, func):  # fails on the kernels it matches, as a refused schedule primitive would
        if library(self, func) is not None:
            raise RuntimeError("forced failure of the conv2d rule")
        return None

    monkeypatch.setattr(Conv2DNHWC, "apply", refuse)
    caplog.set_level("INFO", logger="edgec")
    manifest = compile_small(small_net, tmp_path / "out")

    records = manifest["schedules"]["fallbacks"]
    conv_kernels = [kernel for kernel in rules_of(manifest) if "conv2d" in kernel]
    assert len(conv_kernels) == 2
    assert {record["kernel"] for record in records} == set(conv_kernels)
    assert all(record["rule"] == "conv2d-nhwc" and "forced failure" in record["reason"] for record in records)
    rules = rules_of(manifest)
    assert all(rules[kernel] != "conv2d-nhwc" for kernel in conv_kernels)
    assert "dense" in rules.values()  # the other rules still schedule their kernels
    assert any("fallback: conv2d-nhwc" in message for message in caplog.messages)  # what -v shows
    for call in manifest["kernels"]:
        assert call.get("fallbacks", []) == (["conv2d-nhwc"] if call["kernel"] in conv_kernels else [])


class BrokenLate(Rule):
    """Schedules a conv kernel so that it cannot compile for a CPU (a loop bound to a GPU thread):
    the schedule applies, the failure only surfaces when TVM builds the module."""

    name = "broken-late"

    def apply(self, func):
        from tvm import s_tir

        sch = s_tir.Schedule(func)
        blocks = sch.get_child_blocks(sch.get_sblock("root"))
        if not any(sch.get(block).name_hint.startswith("conv2d") for block in blocks):
            return None
        sch.bind(sch.get_loops(blocks[-1])[0], "threadIdx.x")
        return sch


def test_a_schedule_that_breaks_the_build_is_rebuilt_without_it(small_net, tmp_path, monkeypatch):
    library = schedules.default_rules
    monkeypatch.setattr(schedules, "default_rules", lambda vector: [BrokenLate(vector), *library(vector)])
    manifest = compile_small(small_net, tmp_path / "out")

    records = manifest["schedules"]["fallbacks"]
    conv_kernels = [kernel for kernel in rules_of(manifest) if "conv2d" in kernel]
    assert sorted(record["kernel"] for record in records) == sorted(conv_kernels)
    assert all(record["rule"] == "broken-late" and "does not compile" in record["reason"] for record in records)
    assert all(rules_of(manifest)[kernel] == "conv2d-nhwc" for kernel in conv_kernels)  # the next rule took over

    profile = CliRunner().invoke(cli, ["profile", str(tmp_path / "out"), "--local", "--repeat", "2", "--json"])
    assert profile.exit_code == 0, profile.output
    rows = json.loads(profile.stdout)["rows"]
    assert {row["kernel"] for row in rows if row["fallbacks"]} == set(conv_kernels)
    assert all(row["fallbacks"] == ["broken-late"] for row in rows if row["kernel"] in conv_kernels)


def test_a_graph_rewrite_that_raises_leaves_its_op_alone(small_net, tmp_path, monkeypatch):
    def refuse(*_args, **_kwargs):
        raise ValueError("forced failure of the BN rewrite")

    monkeypatch.setattr(graph_rewrites, "batch_norm_scale_shift", refuse)
    manifest = compile_small(small_net, tmp_path / "out")

    (record,) = manifest["schedules"]["fallbacks"]
    assert record["rule"] == "graph:batch-norm" and "forced failure" in record["reason"]
    assert record["kernel"].startswith("relax.nn.batch_norm(1x16x16x16")  # the op and its shapes
    assert "conv2d-nhwc" in rules_of(manifest).values()


def test_a_graph_pass_that_fails_whole_is_skipped_and_recorded(small_net, tmp_path, monkeypatch):
    from tvm import relax

    def broken(*_args, **_kwargs):
        raise RuntimeError("forced failure of ConvertLayout")

    monkeypatch.setattr(relax.transform, "ConvertLayout", broken)
    manifest = compile_small(small_net, tmp_path / "out")

    assert manifest["schedules"]["fallbacks"] == [
        {"kernel": "*", "rule": "graph:layout", "reason": "forced failure of ConvertLayout"}
    ]
    assert "conv2d-nhwc" not in rules_of(manifest).values()  # NCHW convolutions: the rule does not match


# --- the layout pass on ops ConvertLayout cannot convert ---------------------------------------


def _tensor(name, array):
    return numpy_helper.from_array(np.asarray(array, dtype=np.float32), name)


def zoo_pattern_model(path) -> None:
    """What the onnx wheel's zoo models hold: a Sum of three (TVM: stack + sum, rank 5) and a
    Dropout (TVM: a tuple), between convolutions; weights made by constant subgraphs."""
    rng = np.random.default_rng(0)
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1], name="conv1"),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "w2"], ["c2"], pads=[1, 1, 1, 1], name="conv2"),
        helper.make_node("Sum", ["c1", "r1", "c2"], ["s"], name="sum3"),
        helper.make_node("Dropout", ["s"], ["d"], name="dropout"),
        # the last weight: ConstantOfShape, then Mul by a constant, then Transpose (all folded)
        helper.make_node("ConstantOfShape", ["w3_shape"], ["w3_ones"], value=_tensor("one", [1.0]), name="ones"),
        helper.make_node("Mul", ["w3_ones", "w3_scale"], ["w3_t"], name="scale"),
        helper.make_node("Transpose", ["w3_t"], ["w3"], perm=[1, 0, 2, 3], name="transpose_w3"),
        helper.make_node("Conv", ["d", "w3"], ["y"], name="conv3"),
    ]
    initializers = [
        _tensor("w1", rng.standard_normal((16, 3, 3, 3)) * 0.3),
        _tensor("b1", rng.standard_normal(16) * 0.1),
        _tensor("w2", rng.standard_normal((16, 16, 3, 3)) * 0.1),
        numpy_helper.from_array(np.array([16, 8, 1, 1], dtype=np.int64), "w3_shape"),
        _tensor("w3_scale", rng.standard_normal((16, 8, 1, 1)) * 0.2),
    ]
    graph = helper.make_graph(
        nodes, "zoo_patterns",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(SHAPE))],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8, 16, 16])],
        initializers,
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 9)]), str(path))  # TVM: Dropout-7 -> nn.dropout


def test_layout_fences_only_the_ops_convert_layout_cannot_take(tmp_path):
    zoo_pattern_model(tmp_path / "zoo.onnx")
    result = edgec.compile(edgec.load(tmp_path / "zoo.onnx"), "x86", tmp_path / "out")
    manifest = result.manifest
    assert manifest["verification"]["status"] == "passed"
    layout = [record for record in manifest["schedules"]["fallbacks"] if record["rule"] == "graph:layout"]
    fenced = sorted(record["kernel"].split("(")[0] for record in layout)
    assert fenced == ["relax.nn.dropout", "relax.stack"]
    assert all(record["kernel"] != "*" for record in manifest["schedules"]["fallbacks"])
    # the convolutions around the fenced ops are still channels-last and scheduled by the library
    conv_rules = [rule for kernel, rule in rules_of(manifest).items() if "conv2d" in kernel]
    # (conv2 is 16 -> 16 3x3: a Winograd one, which the rewrite makes of NHWC convolutions only)
    assert len(conv_rules) == 3 and set(conv_rules) == {"conv2d-nhwc", "winograd-transform"}


# --- constant folding -----------------------------------------------------------------------


def test_fold_stage_turns_constant_subgraphs_into_initializers(tmp_path):
    zoo_pattern_model(tmp_path / "zoo.onnx")
    graph = ir.load(str(tmp_path / "zoo.onnx"))
    x = np.random.default_rng(1).standard_normal(SHAPE).astype(np.float32)
    before = run_onnxruntime(graph, [x])

    report = fold_constants(graph)

    assert report.folded == {"ConstantOfShape": 1, "Mul": 1, "Transpose": 1}
    assert report.nodes_before - report.nodes_after == 3
    ops = [node.op_type for node in graph.graph]
    assert ops == ["Conv", "Relu", "Conv", "Sum", "Dropout", "Conv"]
    weight = graph.graph.node(5).inputs[1]
    assert weight.is_initializer() and weight.const_value.shape == (8, 16, 1, 1)
    np.testing.assert_array_equal(run_onnxruntime(graph, [x])[0], before[0])
    assert fold_constants(graph).modified is False  # nothing left to fold


def test_compile_records_what_the_fold_stage_did(tmp_path):
    zoo_pattern_model(tmp_path / "zoo.onnx")
    model = edgec.load(tmp_path / "zoo.onnx")  # loading folds already (every format)...
    model.graph.graph.node(5).replace_input_with(1, _constant_subgraph(model.graph))  # ...a pass left one
    manifest = edgec.compile(model, "x86", tmp_path / "out").manifest
    assert manifest["constant_folding"] == {"nodes_folded": 2, "by_op": {"Reshape": 1, "Transpose": 1}}
    assert manifest["seconds"]["fold"] >= 0 and manifest["verification"]["status"] == "passed"


def _constant_subgraph(graph: ir.Model) -> ir.Value:
    """Reshape + Transpose of a new initializer: the [8, 16, 1, 1] weight of the last conv."""
    weight = ir.Value(name="w_flat", const_value=ir.tensor(np.linspace(-1, 1, 128, dtype=np.float32)))
    shape = ir.Value(name="w_shape", const_value=ir.tensor(np.array([16, 8, 1, 1], dtype=np.int64)))
    for value in (weight, shape):
        value.shape, value.type = ir.Shape(value.const_value.shape), ir.TensorType(value.const_value.dtype)
        graph.graph.register_initializer(value)
    reshape = ir.node("Reshape", [weight, shape], name="reshape_w")
    transpose = ir.node("Transpose", [reshape.outputs[0]], attributes={"perm": [1, 0, 2, 3]}, name="transpose_w")
    conv = graph.graph.node(len(graph.graph) - 1)
    graph.graph.insert_before(conv, [reshape, transpose])
    return transpose.outputs[0]


# --- errors that name the node ----------------------------------------------------------------


def test_expand_of_a_graph_input_is_an_error_naming_the_node(tmp_path):
    nodes = [helper.make_node("Expand", ["x", "shape"], ["y"], name="expand_1")]
    graph = helper.make_graph(
        nodes, "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, 1]),
         helper.make_tensor_value_info("shape", TensorProto.INT64, [2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(tmp_path / "expand.onnx"))
    done = CliRunner().invoke(cli, ["compile", str(tmp_path / "expand.onnx"), "-t", "x86", "-o", str(tmp_path / "out")])
    assert done.exit_code == 1
    errors = [line for line in done.output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1
    assert "node 'expand_1' (Expand)" in errors[0]
    assert "input 'shape' (the graph input 'shape')" in errors[0] and "must be a constant" in errors[0]
    assert "Traceback" not in done.output and not (tmp_path / "out").exists()


def test_an_importer_failure_names_the_node(tmp_path):
    # Reshape to a shape with two -1s: TVM's importer raises inside the node's conversion
    nodes = [helper.make_node("Reshape", ["x", "shape"], ["y"], name="bad_reshape")]
    graph = helper.make_graph(
        nodes, "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 6])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(np.array([-1, -1], dtype=np.int64), "shape")],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(tmp_path / "bad.onnx"))
    done = CliRunner().invoke(cli, ["compile", str(tmp_path / "bad.onnx"), "-t", "x86", "-o", str(tmp_path / "out")])
    assert done.exit_code == 1
    (error,) = [line for line in done.output.splitlines() if line.startswith("Error:")]
    assert "node 'bad_reshape' (Reshape)" in error and "Traceback" not in done.output
