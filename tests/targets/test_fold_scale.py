"""``fold_scale`` (graph.py step 5a): ``conv2d(x, W) * s`` with a constant scale per output channel
becomes ``conv2d(x, W * s)``. Checked: the structure (no multiply left, the weights scaled), the
numbers (both modules built and run), and what is left alone (a scale per pixel, a convolution
whose output is also read elsewhere); and end to end, a Conv + BatchNormalization model compiled
without ``-p fold-bn`` has no multiply in its kernels and its rows still name the batch norm."""

from __future__ import annotations

import numpy as np
import pytest

from edgec.targets.schedules.fold_scale import fold_scale_into_weights, folded_weights

RNG = np.random.default_rng(5)


def _module(scale_shape=(1, 1, 1, 8), groups=1, reread=False):
    """x[1, 6, 6, 8] -> conv2d NHWC/HWIO 3x3 (groups) -> * s (-> + the conv output when ``reread``)."""
    from tvm import relax

    x = relax.Var("x", relax.TensorType((1, 6, 6, 8), "float32"))
    weight = relax.const(RNG.standard_normal((3, 3, 8 // groups, 8)).astype("float32"))
    scale = relax.const(RNG.uniform(0.5, 2.0, scale_shape).astype("float32"))
    builder = relax.BlockBuilder()
    with builder.function("main", [x]):
        with builder.dataflow():
            conv = builder.emit(relax.op.nn.conv2d(x, weight, padding=[1, 1], groups=groups, data_layout="NHWC",
                                                   kernel_layout="HWIO"))  # fmt: skip
            out = builder.emit(relax.op.multiply(conv, scale))
            if reread:
                out = builder.emit(relax.op.add(out, conv))
            out = builder.emit_output(out)
        builder.emit_func_output(out)
    return builder.get()


def _ops(mod) -> list[str]:
    import tvm
    from tvm import relax

    found = []

    def note(node):
        if isinstance(node, relax.Call) and isinstance(node.op, tvm.ir.Op):
            found.append(str(node.op.name))

    relax.analysis.post_order_visit(mod["main"], note)
    return found


def _run(mod) -> np.ndarray:
    import tvm
    from tvm import relax

    data = np.random.default_rng(1).standard_normal((1, 6, 6, 8)).astype("float32")
    vm = relax.VirtualMachine(relax.build(mod, target="llvm"), tvm.cpu())
    return vm["main"](tvm.runtime.tensor(data)).numpy()


@pytest.mark.parametrize("groups", [1, 8], ids=["dense", "depthwise"])
def test_scale_goes_into_the_weights(groups):
    before = _module(groups=groups)
    after = fold_scale_into_weights()(before.clone())
    assert "relax.multiply" not in _ops(after) and _ops(after).count("relax.nn.conv2d") == 1
    np.testing.assert_allclose(_run(after), _run(before), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("case", ["per-pixel scale", "conv read twice"])
def test_other_products_are_left_alone(case):
    before = _module(scale_shape=(1, 6, 6, 8)) if case == "per-pixel scale" else _module(reread=True)
    after = fold_scale_into_weights()(before.clone())
    assert _ops(after) == _ops(before)


def test_folded_weights_scale_the_output_channel_axis_only():
    kernel = RNG.standard_normal((3, 3, 4, 8)).astype("float32")
    scale = np.arange(1, 9, dtype="float32")
    np.testing.assert_array_equal(folded_weights(kernel, scale.reshape(1, 1, 1, 8)), kernel * scale)
    assert folded_weights(kernel, scale[:4]) is None
    assert folded_weights(kernel, scale.astype("float64")) is None


def test_model_without_fold_bn_keeps_no_scale_and_names_its_batch_norms(tmp_path):
    import torch
    from torch import nn

    import edgec

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU6(),
                        nn.Conv2d(16, 16, 3, padding=1, groups=16, bias=False), nn.BatchNorm2d(16)).eval()  # fmt: skip
    for module in net:
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.uniform_(-1, 1)
            module.running_var.uniform_(0.5, 2)
            module.weight.data.uniform_(0.5, 2)
    example = torch.randn(1, 3, 12, 12)
    path = tmp_path / "net.pt"
    torch.jit.trace(net, example).save(str(path))
    result = edgec.compile(edgec.load(path, input_shape=(1, 3, 12, 12)), "x86", tmp_path / "out")
    kernels = result.artifact.manifest["kernels"]
    convolutions = [call for call in kernels if "conv2d" in call["kernel"]]
    assert len(convolutions) == 2 and not any("multiply" in call["kernel"] for call in convolutions)
    assert [[node.split("/")[-1] for node in call["onnx_nodes"]] for call in convolutions] == [
        ["Conv", "BatchNormalization", "Clip"], ["Conv", "BatchNormalization"],
    ]
