"""Tests of passes/fuse_filters.py and passes/remove_zero_channels.py on real models: a
tiny MobileNetV2 exported by PyTorch compiled for x86 and cortex-a7, and a CNN trained on
scikit-learn's digits (accuracy after fusion). Numbers are compared with ONNX Runtime."""

from __future__ import annotations

import dataclasses
import io
import shutil
import sys
import warnings
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

import edgec
from edgec.passes import FuseFiltersPass, RemoveZeroChannelsPass
from edgec.runtimes.reference import run_onnxruntime

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import models  # noqa: E402 - tests/ on sys.path first
from backbone import assert_board_verified  # noqa: E402
from channel_checks import ATOL, RTOL, check_valid, conv_channels, io_signature, sample, to_model  # noqa: E402


# --------------------------------------------------------------------------
# Compiling: a PyTorch-exported MobileNetV2 block stack (depthwise, residual Adds, pool -> Gemm)
# --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fuse_tiny_mobilenet(tmp_path_factory) -> Path:
    import torch

    path = tmp_path_factory.mktemp("fuse_mobilenet") / "mobilenet.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            models.build("mobilenet"),
            (models.example_input("mobilenet"),),
            str(path),
            dynamo=False,
            opset_version=17,
            input_names=["x"],
            output_names=["y"],
            training=torch.onnx.TrainingMode.PRESERVE,
        )
    return path


def test_fused_mobilenet_compiles_for_x86_and_cortex_a7(fuse_tiny_mobilenet, tmp_path):
    model = edgec.load(fuse_tiny_mobilenet)
    before_io = io_signature(model)
    (report,) = edgec.apply(model, [FuseFiltersPass(ratio=0.5, temperature=0.1)])
    assert report.modified and report.macs_after < report.macs_before and report.size_after < report.size_before
    assert io_signature(model) == before_io
    check_valid(model)
    result = edgec.compile(model, "x86", tmp_path / "x86", verify=True)
    verification = result.manifest["verification"]
    assert verification["status"] == "passed" and verification["onnxruntime"]["within_tolerance"]
    assert result.manifest["stats"]["macs"] == report.macs_after
    if shutil.which("arm-linux-gnueabihf-g++") is None:
        pytest.skip("arm-linux-gnueabihf-g++ is not installed (apt-get install g++-arm-linux-gnueabihf)")
    arm = edgec.compile(model, "cortex-a7", tmp_path / "a7")
    assert_board_verified(arm.manifest, "cortex-a7")
    assert (tmp_path / "a7" / "lib.so").read_bytes()[:4] == b"\x7fELF"


def test_masked_mobilenet_compiles_and_matches_onnxruntime(fuse_tiny_mobilenet, tmp_path):
    proto = onnx.load(fuse_tiny_mobilenet)
    weights = {initializer.name: initializer for initializer in proto.graph.initializer}
    # by weight name: the stem and the first block's projection are tied by its residual Add; the head feeds the pool
    zeroed = {"stem.0.weight": [2], "blocks.0.block.2.0.weight": [2], "head.0.weight": [1, 3]}
    convs = {node.input[1]: node.name for node in proto.graph.node if node.op_type == "Conv"}
    assert set(zeroed) <= set(convs)
    for name, channels in zeroed.items():
        array = numpy_helper.to_array(weights[name]).copy()
        array[channels] = 0.0
        weights[name].CopyFrom(numpy_helper.from_array(array, name))
    model = to_model(proto)
    before = conv_channels(model)
    inputs = sample(model)
    reference = run_onnxruntime(model.graph, inputs)
    (report,) = edgec.apply(model, [RemoveZeroChannelsPass()])
    assert report.modified and report.max_abs_deviation < 1e-4
    expected = {convs[name]: before[convs[name]] - len(channels) for name, channels in zeroed.items()}
    assert conv_channels(model) == {**before, **expected}
    np.testing.assert_allclose(run_onnxruntime(model.graph, inputs)[0], reference[0], rtol=RTOL, atol=ATOL)
    result = edgec.compile(model, "x86", tmp_path / "x86", verify=True)
    assert result.manifest["verification"]["status"] == "passed"


# --------------------------------------------------------------------------
# Accuracy on real data: a CNN trained on scikit-learn's digits (8x8 images)
# --------------------------------------------------------------------------


@dataclasses.dataclass
class Digits:
    network: object  # the trained torch module (eval mode)
    onnx_path: Path
    test_images: np.ndarray  # (N, 1, 8, 8) float32
    test_labels: np.ndarray

    def accuracy(self, model: edgec.Model) -> float:
        (logits,) = run_onnxruntime(model.graph, [self.test_images])
        return float(np.mean(logits.argmax(axis=1) == self.test_labels))


def _digits_network(torch):
    from torch import nn

    def block(inputs: int, outputs: int) -> list:
        return [nn.Conv2d(inputs, outputs, 3, padding=1), nn.BatchNorm2d(outputs), nn.ReLU()]

    return nn.Sequential(*block(1, 32), *block(32, 64), nn.MaxPool2d(2), *block(64, 64), nn.Flatten(), nn.Linear(64 * 16, 10))


def _export(torch, network, example: np.ndarray, path: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        buffer = io.BytesIO()
        torch.onnx.export(
            network,
            (torch.from_numpy(example),),
            buffer,
            dynamo=False,
            opset_version=17,
            input_names=["x"],
            output_names=["y"],
            training=torch.onnx.TrainingMode.PRESERVE,
        )
        path.write_bytes(buffer.getvalue())


@pytest.fixture(scope="module")
def fuse_digits(tmp_path_factory) -> Digits:
    """Train for ~5 s on 1200 images (single thread, seeded), hold out the other 597."""
    import torch
    from sklearn.datasets import load_digits

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # deterministic, and fair to the other tests sharing the cores
    try:
        digits = load_digits()
        images = (digits.images / 16.0).astype(np.float32)[:, None]
        labels = digits.target.astype(np.int64)
        order = np.random.default_rng(0).permutation(len(images))
        images, labels = images[order], labels[order]
        train_x, train_y = torch.from_numpy(images[:1200]), torch.from_numpy(labels[:1200])
        torch.manual_seed(1)
        network = _digits_network(torch)
        optimizer = torch.optim.Adam(network.parameters(), lr=3e-3)
        generator = torch.Generator().manual_seed(1)
        for _ in range(15):
            network.train()
            permutation = torch.randperm(len(train_x), generator=generator)
            for start in range(0, len(train_x), 64):
                batch = permutation[start : start + 64]
                optimizer.zero_grad()
                torch.nn.functional.cross_entropy(network(train_x[batch]), train_y[batch]).backward()
                optimizer.step()
        network.eval()
    finally:
        torch.set_num_threads(threads)
    path = tmp_path_factory.mktemp("fuse_digits") / "digits.onnx"
    _export(torch, network, images[1200:], path)  # the whole test set as one static batch
    return Digits(network, path, images[1200:], labels[1200:])


def test_digits_masked_mode_keeps_accuracy_exactly(fuse_digits, tmp_path):
    """Zero filters as channel pruning would (the same in PyTorch), then remove them losslessly."""
    import copy

    import torch

    network = copy.deepcopy(fuse_digits.network)
    conv1, bn1, conv2, bn2, conv3 = network[0], network[1], network[3], network[4], network[7]
    with torch.no_grad():
        # conv1: network-slimming style (filter, bias, BN scale and shift 0): constant 0 before the padded conv2
        for tensor in (conv1.weight, conv1.bias, bn1.weight, bn1.bias):
            tensor[[3, 10, 17]] = 0.0
        # conv2: filter and bias 0; removable only where relu(BN(0)) == 0 (a padded conv3 reads it)
        conv2.weight[[0, 5, 9, 40]] = 0.0
        conv2.bias[[0, 5, 9, 40]] = 0.0
        bn_constant = torch.relu(bn2(torch.zeros(1, 64, 1, 1))).reshape(-1)[[0, 5, 9, 40]]
        # conv3: filter 0, bias kept: a non-zero constant that the Flatten -> Gemm folds block-wise
        conv3.weight[[2, 4, 8, 16, 32, 63]] = 0.0
    expected_conv2 = 64 - int((bn_constant == 0).sum())
    path = tmp_path / "zeroed.onnx"
    _export(torch, network, fuse_digits.test_images, path)
    with torch.no_grad():
        torch_logits = network(torch.from_numpy(fuse_digits.test_images)).numpy()
    torch_accuracy = float(np.mean(torch_logits.argmax(axis=1) == fuse_digits.test_labels))

    model = edgec.load(path)
    dense_accuracy = fuse_digits.accuracy(model)
    result = RemoveZeroChannelsPass()(model.graph)

    assert result.modified is True
    assert list(conv_channels(model).values()) == [29, expected_conv2, 58]
    (logits,) = run_onnxruntime(model.graph, [fuse_digits.test_images])
    np.testing.assert_allclose(logits, torch_logits, rtol=1e-4, atol=1e-4)
    accuracy = fuse_digits.accuracy(model)
    print(
        f"\ndigits masked: accuracy {torch_accuracy:.4f} (PyTorch, zeroed) {dense_accuracy:.4f} (ONNX) -> {accuracy:.4f}; "
        f"conv channels 32/64/64 -> {'/'.join(map(str, conv_channels(model).values()))}"
    )
    assert accuracy == dense_accuracy == torch_accuracy


# Thresholds, from measurements on this setup (no fine-tuning after fusion). The trained
# network scores ~0.99. Fusing at t=0.1 after fold-bn (filters compared as BN-scaled,
# effective filters) measured 0.90-0.97 at ratio 0.25 and 0.37-0.80 at ratio 0.5 over four
# training seeds (0-3) of this network; without fold-bn 0.91-0.97 and 0.11-0.89. This
# fixture's seed (1) gives 0.94 / 0.80 with fold-bn, 0.96 / 0.89 without. Chance is 0.10.
# The asserted floors sit below the worst seed: 0.80 at 0.25; at 0.5 (half of every layer
# gone) only "clearly above chance", 0.25. At t=1.0 (the default was 1.0, now 0.1) the mean-normalised softmax
# is nearly uniform, every kept filter becomes close to the layer's mean filter, and
# accuracy falls to chance: printed, asserted only as "shrinks".
@pytest.mark.parametrize(("ratio", "floor"), [(0.25, 0.80), (0.5, 0.25)])
def test_digits_fuse_mode_accuracy(fuse_digits, ratio, floor):
    from edgec.passes import FoldBatchNormPass

    dense = edgec.load(fuse_digits.onnx_path)
    baseline = fuse_digits.accuracy(dense)
    assert baseline >= 0.95
    results = {}
    for label, passes in {
        "fold-bn + fuse t=0.1": [FoldBatchNormPass(), FuseFiltersPass(ratio=ratio, temperature=0.1)],
        "fuse t=0.1": [FuseFiltersPass(ratio=ratio, temperature=0.1)],
        "fuse t=1.0": [FuseFiltersPass(ratio=ratio, temperature=1.0)],
    }.items():
        model = edgec.load(fuse_digits.onnx_path)
        reports = edgec.apply(model, passes, measure=False)
        assert reports[-1].modified and reports[-1].macs_after < reports[-1].macs_before
        results[label] = (fuse_digits.accuracy(model), reports[-1].macs_after / reports[0].macs_before)
    print(f"\ndigits fuse ratio {ratio}: dense {baseline:.4f}; " + "; ".join(
        f"{label}: {accuracy:.4f} ({macs:.0%} MACs)" for label, (accuracy, macs) in results.items()
    ))
    assert results["fold-bn + fuse t=0.1"][0] >= floor
