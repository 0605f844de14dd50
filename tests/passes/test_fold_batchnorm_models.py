"""Tests of passes/fold_batchnorm.py on real models: PyTorch exports
(torch.onnx.export(dynamo=True)), the ONNX model zoo's light/*.onnx shipped in
the onnx wheel, and through edgec.apply / edgec compile / the CLI. Numeric
equivalence as in test_fold_batchnorm.py."""

from __future__ import annotations

import json
import logging
import warnings

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import helper, numpy_helper

import edgec
from edgec.apply_passes import apply as apply_passes
from edgec.passes import FoldBatchNormPass
from batchnorm_graphs import (  # tests/passes/batchnorm_graphs.py
    LOGGER,
    RTOL,
    LIGHT,
    make_model,
    bn_params,
    bn_node,
    randn,
    run,
    assert_close,
    well_formed,
    ops,
    signature,
    serialized,
    skip_messages,
)


# --------------------------------------------------------------------------
# models exported from PyTorch (torch.onnx.export(dynamo=True, optimize=False))
# --------------------------------------------------------------------------


def _torch_modules():
    import torch
    from torch import nn

    class ConvNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Conv2d(3, 8, 3, padding=1, bias=False)
            self.stem_bn = nn.BatchNorm2d(8)
            self.depthwise = nn.Conv2d(8, 8, 3, padding=1, groups=8)
            self.depthwise_bn = nn.BatchNorm2d(8)
            self.grouped = nn.Conv2d(8, 12, 1, groups=4, bias=False)
            self.grouped_bn = nn.BatchNorm2d(12)
            self.up = nn.ConvTranspose2d(12, 6, 2, stride=2, groups=2)
            self.up_bn = nn.BatchNorm2d(6)
            self.fc = nn.Linear(6, 5)
            self.fc_bn = nn.BatchNorm1d(5)

        def forward(self, x):
            y = torch.relu(self.stem_bn(self.stem(x)))
            y = torch.relu(self.depthwise_bn(self.depthwise(y)))
            y = self.grouped_bn(self.grouped(y)) + y.repeat(1, 2, 1, 1)[:, :12]
            y = self.up_bn(self.up(y))
            return self.fc_bn(self.fc(y.mean((2, 3))))

    class Conv1dNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv1d(4, 6, 3)
            self.bn = nn.BatchNorm1d(6)

        def forward(self, x):
            return self.bn(self.conv(x))

    torch.manual_seed(0)
    modules = {"convnet": (ConvNet(), (2, 3, 8, 8)), "conv1d": (Conv1dNet(), (2, 4, 10))}
    for module, _ in modules.values():
        for layer in module.modules():
            if isinstance(layer, nn.modules.batchnorm._BatchNorm):  # non-trivial statistics
                channels = layer.num_features
                layer.running_mean.uniform_(-1, 1)
                layer.running_var.uniform_(0.3, 3)
                layer.weight.data.uniform_(0.5, 1.5).mul_(torch.randint(0, 2, (channels,)) * 2 - 1)
                layer.bias.data.uniform_(-1, 1)
        module.eval()
    return modules


@pytest.fixture(scope="module")
def fold_bn_torch_exports():
    """name -> (module, example input, exported onnx_ir model), exported once per module."""
    import torch

    exports = {}
    for name, (module, shape) in _torch_modules().items():
        x = torch.randn(shape, generator=torch.Generator().manual_seed(1))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(module, (x,), dynamo=True, optimize=False, verbose=False)
        exports[name] = (module, x, ir.serde.serialize_model(program.model))
    return exports


@pytest.mark.parametrize("cleaned", [False, True], ids=["raw_export", "after_frontend_cleanup"])
@pytest.mark.parametrize("name", ["convnet", "conv1d"])
def test_torch_dynamo_exports(fold_bn_torch_exports, name, cleaned, caplog):
    import torch

    caplog.set_level(logging.INFO, logger=LOGGER)
    module, x, proto = fold_bn_torch_exports[name]
    model = ir.serde.deserialize_model(proto)
    if cleaned:
        edgec.from_onnx_ir(model)  # inlining, constant folding, shape inference, as edgec.load does
    count = ops(model)["BatchNormalization"]
    assert count == sum(isinstance(layer, torch.nn.modules.batchnorm._BatchNorm) for layer in module.modules())
    feeds = {model.graph.inputs[0].name: x.numpy()}
    before, before_signature = run(model, feeds), signature(model)

    assert FoldBatchNormPass()(model).modified is True

    assert ops(model)["BatchNormalization"] == 0
    assert signature(model) == before_signature
    assert skip_messages(caplog) == []
    after = run(model, feeds)
    assert_close(after, before)
    with torch.no_grad():
        assert_close(after, [module(x).numpy()])


# --------------------------------------------------------------------------
# the ONNX backend's "light" models (weights replaced by ConstantOfShape)
# --------------------------------------------------------------------------
# onnx's backend runner (onnx/backend/test/runner/__init__.py, generate_dummy_data
# with random=False) made light_*_output_0.pb with the input arange(n) / n in
# float32, shaped like the graph input; that input is reproduced here. Those
# outputs are nearly constant (every weight is the same number), so each model
# is also checked on every BatchNormalization's output, with seeded random
# statistics, against ONNX Runtime before the pass.

LIGHT_WITH_BATCHNORM = {
    "resnet50": False,
    "shufflenet": False,
    "inception_v2": False,  # BN followed by Caffe Scale (Mul/Add of Unsqueeze'd constants)
    "densenet121": True,  # 62 of its 121 BNs follow a Concat/pool: lower_unfolded removes those
}
LIGHT_WITHOUT_BATCHNORM = ["bvlc_alexnet", "inception_v1", "squeezenet", "vgg19", "zfnet512"]


def light_input(model: ir.Model) -> dict[str, np.ndarray]:
    (value,) = [value for value in model.graph.inputs if not value.is_initializer()]
    shape = tuple(int(dim) for dim in value.shape)
    count = int(np.prod(shape))
    return {value.name: (np.arange(count).reshape(shape) / count).astype(np.float32)}


def constant_shape(value: ir.Value) -> tuple[int, ...]:
    """The shape of an initializer, or of a ConstantOfShape's output (the light models' weights)."""
    if value.const_value is not None:
        return tuple(value.const_value.shape)
    producer = value.producer()
    assert producer is not None and producer.op_type == "ConstantOfShape", value
    return tuple(int(dim) for dim in producer.inputs[0].const_value.numpy())


def add_legacy_initializer(graph: ir.Graph, name: str, array: np.ndarray) -> ir.Value:
    tensor = ir.tensor(array.astype(np.float32))
    value = ir.Value(name=name, shape=tensor.shape, type=ir.TensorType(tensor.dtype), const_value=tensor)
    graph.register_initializer(value)
    graph.inputs.append(value)  # IR version 3: every initializer is listed as an input too
    return value


def randomize_and_expose_batchnorms(model: ir.Model, rng) -> None:
    """Seeded random Conv weights (He-scaled, so activations stay O(1)) and batch-norm statistics;
    every BatchNormalization output also made a graph output."""
    graph = model.graph
    for node in list(graph):
        if node.op_type == "Conv":
            shape = constant_shape(node.inputs[1])
            weight = rng.standard_normal(shape) * np.sqrt(2.0 / np.prod(shape[1:]))
            node.replace_input_with(1, add_legacy_initializer(graph, f"{node.name}_random_w", weight))
        elif node.op_type == "BatchNormalization":
            (channels,) = constant_shape(node.inputs[1])
            arrays = [
                rng.uniform(0.5, 1.5, channels) * rng.choice([-1, 1], channels),
                rng.uniform(-1, 1, channels),
                rng.uniform(-1, 1, channels),
                rng.uniform(0.2, 3, channels),
            ]
            for index, array in enumerate(arrays, start=1):
                node.replace_input_with(index, add_legacy_initializer(graph, f"{node.name}_random_{index}", array))
            graph.outputs.append(node.outputs[0])


@pytest.mark.parametrize("name", sorted(LIGHT_WITH_BATCHNORM))
def test_light_models_fold_every_batchnorm(name, caplog):
    caplog.set_level(logging.INFO, logger=LOGGER)
    fold = FoldBatchNormPass(lower_unfolded=LIGHT_WITH_BATCHNORM[name])
    path = LIGHT / f"light_{name}.onnx"
    shipped = numpy_helper.to_array(onnx.load_tensor(str(LIGHT / f"light_{name}_output_0.pb")))

    # 1. as shipped, on the runner's input: the shipped output, before and after
    model = ir.load(str(path))
    assert model.ir_version == 3 and ops(model)["BatchNormalization"] > 0
    feeds = light_input(model)
    real_inputs = [value.name for value in model.graph.inputs if not value.is_initializer()]
    before = run(model, feeds)
    assert before[0].shape == shipped.shape
    assert_close(before, [shipped])
    assert fold(model).modified is True
    assert ops(model)["BatchNormalization"] == 0
    assert [value.name for value in model.graph.inputs if not value.is_initializer()] == real_inputs
    assert [value.name for value in model.graph.outputs] == [value.name for value in ir.load(str(path)).graph.outputs]
    well_formed(model)
    after = run(model, feeds)
    assert after[0].shape == shipped.shape
    assert_close(after, [shipped])
    if not LIGHT_WITH_BATCHNORM[name]:
        assert not [message for message in skip_messages(caplog)]

    # 2. random weights and statistics, every BN output compared, on a seeded random input
    model = ir.load(str(path))
    randomize_and_expose_batchnorms(model, np.random.default_rng(30))
    batchnorm_outputs = ops(model)["BatchNormalization"]
    rng = np.random.default_rng(31)
    feeds = {name: rng.standard_normal(array.shape).astype(np.float32) for name, array in feeds.items()}
    before = run(model, feeds)
    assert len(before) == batchnorm_outputs + 1
    for output in before[1:]:  # a comparison that means something: finite, far from overflow, not constant
        assert np.all(np.isfinite(output)) and float(np.max(np.abs(output))) < 1e8
        assert float(np.std(output)) > 1e-2
    assert fold(model).modified is True
    assert ops(model)["BatchNormalization"] == 0
    assert_close(run(model, feeds), before)


@pytest.mark.parametrize("name", LIGHT_WITHOUT_BATCHNORM)
def test_light_models_without_batchnorm_are_unchanged(name, caplog):
    caplog.set_level(logging.INFO, logger=LOGGER)
    model = ir.load(str(LIGHT / f"light_{name}.onnx"))
    before = serialized(model)
    assert FoldBatchNormPass(lower_unfolded=True)(model).modified is False
    assert serialized(model) == before
    assert skip_messages(caplog) == []


# --------------------------------------------------------------------------
# through edgec: apply, compile, the CLI
# --------------------------------------------------------------------------


def small_cnn_proto(seed: int = 40) -> onnx.ModelProto:
    """Conv-BN-Relu, depthwise Conv-BN-Relu, GlobalAveragePool, Flatten, Gemm-BN: 1x3x16x16 -> 1x5."""
    rng = np.random.default_rng(seed)
    inits = {
        "w1": randn(rng, 8, 3, 3, 3) * 0.5,
        **bn_params(rng, 8, "bn1"),
        "w2": randn(rng, 8, 1, 3, 3) * 0.5,
        "b2": randn(rng, 8),
        **bn_params(rng, 8, "bn2"),
        "wf": randn(rng, 5, 8),
        "bf": randn(rng, 5),
        **bn_params(rng, 5, "bn3"),
    }
    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        bn_node("c1", "n1", "bn1", "bn1"),
        helper.make_node("Relu", ["n1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], name="conv2", pads=[1, 1, 1, 1], group=8),
        bn_node("c2", "n2", "bn2", "bn2"),
        helper.make_node("Relu", ["n2"], ["r2"], name="relu2"),
        helper.make_node("GlobalAveragePool", ["r2"], ["p"], name="pool"),
        helper.make_node("Flatten", ["p"], ["f"], name="flatten"),
        helper.make_node("Gemm", ["f", "wf", "bf"], ["g"], name="fc", transB=1),
        bn_node("g", "y", "bn3", "bn3"),
    ]
    return ir.serde.serialize_model(make_model(nodes, {"x": [1, 3, 16, 16]}, {"y": [1, 5]}, inits))


def test_through_edgec_apply():
    import edgec.compiler  # noqa: F401 - importing the pipeline must not shadow edgec.apply

    model = edgec.from_onnx_ir(ir.serde.deserialize_model(small_cnn_proto()))
    (report,) = edgec.apply(model, [FoldBatchNormPass()])
    assert report.name == "fold-bn" and report.options == {"lower_unfolded": False}
    assert report.modified is True
    assert report.nodes_changed > 0
    assert report.params_after < report.params_before
    assert report.params_before - report.params_after == 4 * (8 + 8 + 5) - 8  # the statistics go; conv1 gains a bias
    assert report.max_rel_deviation is not None and report.max_rel_deviation <= RTOL
    assert model.pass_reports == [report]
    assert ops(model.graph)["BatchNormalization"] == 0


def test_compile_x86_after_the_pass(tmp_path):
    model = edgec.from_onnx_ir(ir.serde.deserialize_model(small_cnn_proto()))
    apply_passes(model, [FoldBatchNormPass()])
    result = edgec.compile(model, "x86", tmp_path / "artifact")
    manifest = result.manifest
    assert manifest["verification"]["status"] == "passed"
    assert manifest["verification"]["onnxruntime"]["within_tolerance"] is True
    assert [report["name"] for report in manifest["passes"]] == ["fold-bn"]
    assert "BatchNormalization" not in manifest["stats"]["op_counts"]
    # the compiled library against ONNX Runtime on the graph *before* the pass
    from edgec.runtimes.local import LocalRunner

    original = ir.serde.deserialize_model(small_cnn_proto())
    x = np.random.default_rng(41).standard_normal((1, 3, 16, 16)).astype(np.float32)
    got = LocalRunner(result.artifact).run([x])
    np.testing.assert_allclose(got[0], run(original, {"x": x})[0], rtol=1e-4, atol=1e-4)


def test_cli_compile_with_fold_bn(tmp_path, restore_logging):
    from click.testing import CliRunner

    from edgec.cli import cli

    source = tmp_path / "model.onnx"
    onnx.save(small_cnn_proto(), str(source))
    output = tmp_path / "artifact"
    result = CliRunner().invoke(
        cli, ["compile", str(source), "-t", "x86", "-p", "fold-bn", "-o", str(output)], prog_name="edgec"
    )
    assert result.exit_code == 0, result.output
    manifest = json.loads((output / "manifest.json").read_text())
    (report,) = manifest["passes"]
    assert report["name"] == "fold-bn"
    assert report["modified"] is True and report["nodes_changed"] > 0
    assert report["max_rel_deviation"] <= RTOL
    assert manifest["verification"]["status"] == "passed"
    assert "BatchNormalization" not in manifest["stats"]["op_counts"]

    listed = CliRunner().invoke(cli, ["passes", "--json"], prog_name="edgec")
    assert listed.exit_code == 0, listed.output
    entry = next(entry for entry in json.loads(listed.stdout) if entry["name"] == "fold-bn")
    assert entry["class"] == "FoldBatchNormPass"
    assert [option["name"] for option in entry["options"]] == ["lower_unfolded"]
