"""The block-sparse pass (passes/pack_block_sparse.py).

Numbers: the packed model under the NumPy references equals the masked dense
model (pack=false) under ONNX Runtime, and both equal the *original* graph
with the original weights masked in their original channel order (the mask
from the pure functions), so the rearrangement is compensated exactly:
rtol 1e-4 / atol 1e-5 (float32 sums taken in another order). Compiled x86
equals the NumPy reference within edgec's own verification (rtol 1e-4).
"""

from __future__ import annotations

import importlib.util
import logging
import sys
from pathlib import Path

import numpy as np
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

import edgec
from edgec.passes import PASSES, PackBlockSparsePass
from edgec.passes.block_sparsity import (
    block_mask,
    block_norms,
    block_sparsify,
    element_mask,
    filter_order,
    group_order,
    kept_mass,
    pack_blocks,
    prune_count,
    rearrangement,
)
from edgec.passes.registry import parse
from edgec.runtimes.reference import run_numpy_reference, run_onnxruntime
from edgec.core.stats import node_macs

RTOL, ATOL = 1e-4, 1e-5
LOGGER = "edgec.passes.pack_block_sparse"


# ---- the math -------------------------------------------------------------------------------


def test_block_norms_and_filter_order():
    weight = np.arange(8 * 3 * 2 * 2, dtype=np.float32).reshape(8, 3, 2, 2) - 40
    norms = block_norms(weight, 4)
    assert norms.shape == (2, 3)
    assert norms[1, 2] == pytest.approx(np.abs(weight[4:8, 2]).sum())
    order = filter_order(weight)
    filters = np.abs(weight).reshape(8, -1).sum(1)
    assert list(filters[order]) == sorted(filters, reverse=True)
    with pytest.raises(ValueError, match="multiple of n=3"):
        block_norms(weight, 3)


def test_group_order_puts_filters_that_share_input_channels_in_one_block():
    # 8 filters of equal norm: the even ones read channels 0-3, the odd ones channels 4-7.
    # In their own order (and in the paper's norm order, a tie) every block of 4 filters
    # mixes both, so 50% block pruning drops half of every filter; grouped, it drops nothing.
    weight = np.zeros((8, 8, 1, 1))
    weight[0::2, :4] = 1.0
    weight[1::2, 4:] = 1.0
    order = group_order(weight, 4, 0.5)
    assert sorted(order.tolist()) == list(range(8))
    assert {frozenset(order[:4].tolist()), frozenset(order[4:].tolist())} == {frozenset({0, 2, 4, 6}), frozenset({1, 3, 5, 7})}
    assert kept_mass(weight, np.arange(8), 4, 0.5) == pytest.approx(16.0)
    assert kept_mass(weight, order, 4, 0.5) == pytest.approx(32.0)  # all of it
    assert rearrangement(weight, 4, 0.5).tolist() == order.tolist()


def test_rearrangement_is_the_identity_when_no_order_keeps_more():
    weight = np.ones((8, 6, 3, 3))  # every order keeps the same mass
    assert rearrangement(weight, 4, 0.5).tolist() == list(range(8))


def test_block_mask_prunes_smallest_and_keeps_trained_zeros():
    norms = np.array([[5.0, 1.0, 3.0], [0.5, 4.0, 2.0]])
    keep = block_mask(norms, 0.5)  # floor(0.5 * 6) = 3 smallest go: 0.5, 1, 2
    assert keep.tolist() == [[True, False, True], [False, True, False]]
    assert prune_count(6, 0.5) == 3 and prune_count(7, 0.5) == 3
    trained = np.array([[0.0, 1.0, 0.0], [0.0, 4.0, 2.0]])  # 3 zero blocks reach the 3 to prune
    assert block_mask(trained, 0.5).tolist() == (trained > 0).tolist()
    assert block_mask(trained, 0.0).tolist() == (trained > 0).tolist()  # zero blocks are never stored


def test_pack_blocks_layout():
    rng = np.random.default_rng(0)
    weight = rng.standard_normal((8, 5, 3, 3)).astype(np.float32)
    keep = rng.random((2, 5)) < 0.5
    values, indices, indptr = pack_blocks(weight, keep, 4)
    assert values.shape == (keep.sum(), 4, 3, 3) and values.dtype == np.float32
    assert indices.dtype == np.int32 and indptr.dtype == np.int32
    assert indptr.tolist() == [0, int(keep[0].sum()), int(keep.sum())]
    for k in range(indptr[1], indptr[2]):
        np.testing.assert_array_equal(values[k], weight[4:8, indices[k]])
    mask = element_mask(keep, 4, weight.shape)
    assert mask.shape == weight.shape and mask[5, :, 0, 0].tolist() == keep[1].tolist()


def test_block_sparsify_rearranges_unless_trained():
    rng = np.random.default_rng(1)
    weight = rng.standard_normal((8, 6)).astype(np.float32) * rng.uniform(0.1, 3, (8, 1)).astype(np.float32)
    decision = block_sparsify(weight, 4, 0.5, rearrange=True)
    assert sorted(decision.perm.tolist()) == list(range(8)) and not decision.trained
    assert decision.sparsity == pytest.approx(0.5)
    permuted = element_mask(decision.keep, 4, weight.shape)
    np.testing.assert_array_equal(decision.mask(4, weight.shape)[decision.perm], permuted)
    sparse = weight.copy()
    sparse[4:8, 1] = 0
    again = block_sparsify(sparse, 4, 0.5, rearrange=True)
    assert again.trained and again.perm.tolist() == list(range(8))


# ---- graphs ---------------------------------------------------------------------------------


def make_model(nodes, x_shape, y_shape, initializers: dict[str, np.ndarray], opset: int = 17) -> ir.Model:
    proto = helper.make_model(
        helper.make_graph(
            nodes,
            "g",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x_shape))],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, list(y_shape))],
            [numpy_helper.from_array(np.asarray(array), name) for name, array in initializers.items()],
        ),
        opset_imports=[helper.make_opsetid("", opset)],
    )
    proto.ir_version = 8
    return ir.serde.deserialize_model(proto)


def single_layer(kind: str, seed: int = 0) -> ir.Model:
    rng = np.random.default_rng(seed)
    if kind == "gemm":
        inits = {"w": rng.standard_normal((16, 24)).astype(np.float32), "c": rng.standard_normal(16).astype(np.float32)}
        nodes = [helper.make_node("Gemm", ["x", "w", "c"], ["g"], name="fc", transB=1, alpha=0.5),
                 helper.make_node("Relu", ["g"], ["y"], name="relu")]  # fmt: skip
        return make_model(nodes, (2, 24), (2, 16), inits)
    kernel, pads = ((1, 1), [0, 0, 0, 0]) if kind == "pointwise" else ((3, 3), [1, 1, 1, 1])
    inits = {
        "w": rng.standard_normal((16, 12, *kernel)).astype(np.float32),
        "b": rng.standard_normal(16).astype(np.float32),
        "lo": np.float32(0),
        "hi": np.float32(6),
    }
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["c"], name="conv", pads=pads),
             helper.make_node("Clip", ["c", "lo", "hi"], ["y"], name="relu6")]  # fmt: skip
    return make_model(nodes, (1, 12, 6, 6), (1, 16, 6, 6), inits)


def chain_model(seed: int = 0) -> ir.Model:
    """conv1 1x1 -> BN -> ReLU -> depthwise 3x3 (+bias) -> BN -> Clip -> conv2 1x1 -> BN -> Relu -> GAP -> Flatten -> Gemm.

    conv1's permutation must go through BN + ReLU + the depthwise conv + its BN and Clip into
    conv2's input channels; conv2's through BN, Relu, the pool and Flatten into the Gemm's B.
    """
    rng = np.random.default_rng(seed)
    inits: dict[str, np.ndarray] = {}

    def bn(name: str, channels: int, source: str, out: str) -> object:
        inits[f"{name}_g"] = rng.uniform(0.5, 1.5, channels).astype(np.float32)
        inits[f"{name}_b"] = rng.uniform(-0.2, 0.2, channels).astype(np.float32)
        inits[f"{name}_m"] = rng.uniform(-0.5, 0.5, channels).astype(np.float32)
        inits[f"{name}_v"] = rng.uniform(0.5, 2.0, channels).astype(np.float32)
        return helper.make_node("BatchNormalization", [source, *(f"{name}_{s}" for s in "gbmv")], [out], name=name)

    # filters of varied scale so that the rearrangement does something
    inits["w1"] = (rng.standard_normal((16, 8, 1, 1)) * rng.uniform(0.1, 2, (16, 1, 1, 1))).astype(np.float32)
    inits["wd"] = rng.standard_normal((16, 1, 3, 3)).astype(np.float32)
    inits["bd"] = rng.standard_normal(16).astype(np.float32)
    inits["w2"] = (rng.standard_normal((24, 16, 1, 1)) * rng.uniform(0.1, 2, (24, 1, 1, 1))).astype(np.float32)
    inits["fc"] = rng.standard_normal((12, 24)).astype(np.float32)
    inits["fcb"] = rng.standard_normal(12).astype(np.float32)
    inits["lo"], inits["hi"] = np.float32(0), np.float32(6)
    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["c1"], name="conv1"),
        bn("bn1", 16, "c1", "n1"),
        helper.make_node("Relu", ["n1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "wd", "bd"], ["d"], name="dw", group=16, pads=[1, 1, 1, 1]),
        bn("bnd", 16, "d", "nd"),
        helper.make_node("Clip", ["nd", "lo", "hi"], ["rd"], name="relu6"),
        helper.make_node("Conv", ["rd", "w2"], ["c2"], name="conv2"),
        bn("bn2", 24, "c2", "n2"),
        helper.make_node("Relu", ["n2"], ["r2"], name="relu2"),
        helper.make_node("GlobalAveragePool", ["r2"], ["p"], name="pool"),
        helper.make_node("Flatten", ["p"], ["f"], name="flatten"),
        helper.make_node("Gemm", ["f", "fc", "fcb"], ["y"], name="fc", transB=1),
    ]
    return make_model(nodes, (1, 8, 7, 7), (1, 12), inits)


def copy(model: ir.Model) -> ir.Model:
    return ir.serde.deserialize_model(ir.serde.serialize_model(model))


def initializer(model: ir.Model, name: str) -> np.ndarray:
    return model.graph.initializers[name].const_value.numpy()


def batchnorm_scale(model: ir.Model, name: str) -> np.ndarray:
    gamma, var = initializer(model, f"{name}_g"), initializer(model, f"{name}_v")
    return (gamma / np.sqrt(var.astype(np.float64) + 1e-5)).astype(np.float32)


def expected_masked(model: ir.Model, layers: dict[str, tuple[str, str | None]], n: int, sparsity: float, rearrange: bool) -> ir.Model:
    """The original graph with each layer's original weight masked in its original channel order.

    ``layers``: weight initializer -> (batch norm after it or None); the mask comes from the
    pure functions on the weight as it acts on the output (W * BN scale).
    """
    expected = copy(model)
    for weight_name, batchnorm in layers.items():
        weight = initializer(model, weight_name)
        effective = weight if batchnorm is None else weight * batchnorm_scale(model, batchnorm).reshape(-1, *[1] * (weight.ndim - 1))
        decision = block_sparsify(effective, n, sparsity, rearrange)
        value = expected.graph.initializers[weight_name]
        value.const_value = ir.tensor(weight * decision.mask(n, weight.shape))
    return expected


def custom_nodes(model: ir.Model) -> list[ir.Node]:
    return [node for node in model.graph if node.domain == "edgec"]


# ---- matches ----------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["pointwise", "conv", "gemm"])
def test_match_packs_and_equals_masked_dense(kind):
    original = single_layer(kind)
    x_shape = (2, 24) if kind == "gemm" else (1, 12, 6, 6)
    x = np.random.default_rng(5).standard_normal(x_shape).astype(np.float32)
    packed = copy(original)
    result = PackBlockSparsePass(n=4, sparsity=0.5)(packed)
    assert result.modified is True
    nodes = custom_nodes(packed)
    assert [node.op_type for node in nodes] == ["BlockSparseGemm" if kind == "gemm" else "BlockSparseConv"]
    assert [node.op_type for node in packed.graph] == [nodes[0].op_type]  # bias and activation absorbed
    assert nodes[0].attributes["activation"].value == ("Relu" if kind == "gemm" else "Clip")
    masked = copy(original)
    assert PackBlockSparsePass(n=4, sparsity=0.5, pack=False)(masked).modified is True
    assert not custom_nodes(masked)
    (got,) = run_numpy_reference(packed, [x])
    (want,) = run_onnxruntime(masked, [x])
    np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL)
    # a single layer reaching the graph output is not rearranged: the mask is in the original order
    (reference,) = run_onnxruntime(expected_masked(original, {"w": None}, 4, 0.5, rearrange=False), [x])
    np.testing.assert_allclose(got, reference, rtol=RTOL, atol=ATOL)
    # preserved interface
    assert [v.name for v in packed.graph.inputs] == ["x"] and [v.name for v in packed.graph.outputs] == ["y"]
    assert packed.graph.outputs[0].shape == original.graph.outputs[0].shape


def test_packed_initializers_scale_with_kept_blocks():
    sizes = {}
    for sparsity in (0.25, 0.75):
        model = single_layer("conv")
        PackBlockSparsePass(n=4, sparsity=sparsity)(model)
        (node,) = custom_nodes(model)
        values, indices, indptr, bias = (node.inputs[i].const_value.numpy() for i in range(1, 5))
        kept = 4 * 12 - int(np.floor(sparsity * 4 * 12))
        assert indices.size == kept and values.shape == (kept, 4, 3, 3) and indptr.size == 16 // 4 + 1
        assert bias.shape == (16,) and "w" not in model.graph.initializers  # the dense weight is gone
        sizes[sparsity] = values.nbytes + indices.nbytes + indptr.nbytes
        assert node_macs(node) == 6 * 6 * values.size  # the report counts the kept blocks' work only
    kept_ratio = (48 - 12) / (48 - 36)
    assert sizes[0.25] / sizes[0.75] == pytest.approx(kept_ratio, rel=0.05)


def test_grouped_conv_is_excluded_with_a_reason(caplog):
    rng = np.random.default_rng(0)
    model = make_model(
        [helper.make_node("Conv", ["x", "w"], ["y"], name="dw", group=8, pads=[1, 1, 1, 1])],
        (1, 8, 5, 5), (1, 8, 5, 5), {"w": rng.standard_normal((8, 1, 3, 3)).astype(np.float32)},
    )  # fmt: skip
    with caplog.at_level(logging.INFO, logger=LOGGER):
        result = PackBlockSparsePass(n=4)(model)
    assert result.modified is False
    assert "Conv 'dw' not packed: grouped convolution (group=8)" in caplog.text


@pytest.mark.parametrize(
    ("options", "reason"),
    [
        ({"n": 3}, "16 output channels are not a multiple of n=3"),
        ({"sparsity": 0.0}, "no block to drop"),
        ({"kinds": ("conv",)}, "a pointwise layer, and kinds=conv"),
    ],
)
def test_non_match_is_unmodified_with_a_reason(options, reason, caplog):
    model = single_layer("pointwise")
    before = ir.serde.serialize_model(model).SerializeToString()
    with caplog.at_level(logging.INFO, logger=LOGGER):
        result = PackBlockSparsePass(**options)(model)
    assert result.modified is False
    assert reason in caplog.text
    assert ir.serde.serialize_model(model).SerializeToString() == before


def test_layers_naming_a_missing_node_is_refused():
    """A typo in layers= used to match nothing, silently."""
    model = single_layer("pointwise")
    with pytest.raises(ir.passes.PreconditionError, match="layers='other' names no node"):
        PackBlockSparsePass(layers=("other",))(model)


def test_non_constant_weight_is_skipped(caplog):
    proto = helper.make_model(
        helper.make_graph(
            [helper.make_node("Conv", ["x", "w"], ["y"], name="conv")], "g",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 3, 3]),
             helper.make_tensor_value_info("w", TensorProto.FLOAT, [8, 4, 1, 1])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8, 3, 3])],
        ),
        opset_imports=[helper.make_opsetid("", 17)],
    )  # fmt: skip
    with caplog.at_level(logging.INFO, logger=LOGGER):
        assert PackBlockSparsePass()(ir.serde.deserialize_model(proto)).modified is False
    assert "its weight 'w' is not a constant" in caplog.text


# ---- rearrangement --------------------------------------------------------------------------


@pytest.mark.parametrize("rearrange", [True, False])
def test_permutation_is_compensated_exactly(rearrange, caplog):
    original = chain_model()
    x = np.random.default_rng(3).standard_normal((1, 8, 7, 7)).astype(np.float32)
    expected = expected_masked(original, {"w1": "bn1", "w2": "bn2"}, 4, 0.5, rearrange)
    (want,) = run_onnxruntime(expected, [x])
    (dense_out,) = run_onnxruntime(original, [x])
    assert np.abs(want - dense_out).max() > 1e-2  # the pruning does change the function

    masked = copy(original)
    PackBlockSparsePass(n=4, sparsity=0.5, rearrange=rearrange, kinds=("pointwise",), pack=False)(masked)
    (got_masked,) = run_onnxruntime(masked, [x])
    np.testing.assert_allclose(got_masked, want, rtol=RTOL, atol=ATOL)

    packed = copy(original)
    with caplog.at_level(logging.INFO, logger=LOGGER):
        result = PackBlockSparsePass(n=4, sparsity=0.5, rearrange=rearrange, kinds=("pointwise",))(packed)
    assert result.modified
    (got,) = run_numpy_reference(packed, [x])
    np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL)
    ops = [node.op_type for node in packed.graph]
    assert ops == ["BlockSparseConv", "Conv", "BatchNormalization", "Clip", "BlockSparseConv", "GlobalAveragePool", "Flatten", "Gemm"]
    if rearrange:
        assert caplog.text.count("rearranged") >= 2
        # the permutation really moved the channels: the depthwise weights are reordered
        assert not np.array_equal(initializer(packed, packed.graph.node(1).inputs[1].name), initializer(original, "wd"))


def test_residual_add_blocks_rearrangement_but_still_packs(caplog):
    rng = np.random.default_rng(0)
    inits = {"w1": rng.standard_normal((8, 8, 1, 1)).astype(np.float32) * rng.uniform(0.1, 2, (8, 1, 1, 1)).astype(np.float32)}
    nodes = [helper.make_node("Conv", ["x", "w1"], ["c"], name="conv1"), helper.make_node("Add", ["c", "x"], ["y"], name="residual")]
    model = make_model(nodes, (1, 8, 4, 4), (1, 8, 4, 4), inits)
    original = copy(model)
    with caplog.at_level(logging.INFO, logger=LOGGER):
        assert PackBlockSparsePass(n=4, sparsity=0.5)(model).modified
    assert "Conv 'conv1' not rearranged: its channels meet another computed tensor in Add 'residual'" in caplog.text
    x = np.random.default_rng(1).standard_normal((1, 8, 4, 4)).astype(np.float32)
    (want,) = run_onnxruntime(expected_masked(original, {"w1": None}, 4, 0.5, rearrange=False), [x])
    np.testing.assert_allclose(run_numpy_reference(model, [x])[0], want, rtol=RTOL, atol=ATOL)


def test_already_sparse_weights_are_not_repruned(caplog):
    rng = np.random.default_rng(4)
    weight = rng.standard_normal((16, 12, 1, 1)).astype(np.float32)
    trained_zero = (rng.permutation(48) < 29).reshape(4, 12)  # 29 of 48 blocks (60%) zero after training
    weight *= ~element_mask(trained_zero, 4, weight.shape)
    model = single_layer("pointwise")
    model.graph.initializers["w"].const_value = ir.tensor(weight)
    original = copy(model)
    with caplog.at_level(logging.INFO, logger=LOGGER):
        assert PackBlockSparsePass(n=4, sparsity=0.5, rearrange=True)(model).modified
    assert "taken as trained, not rearranged" in caplog.text
    (node,) = custom_nodes(model)
    values, indices, indptr = (node.inputs[i].const_value.numpy() for i in range(1, 4))
    assert indices.size == int((~trained_zero).sum())  # every non-zero block kept, no more pruned
    rows = np.repeat(np.arange(4), np.diff(indptr))
    assert (~trained_zero)[rows, indices].all()
    np.testing.assert_array_equal(values[:, :, 0, 0], np.stack([weight[4 * r : 4 * r + 4, c, 0, 0] for r, c in zip(rows, indices)]))
    x = np.random.default_rng(2).standard_normal((1, 12, 6, 6)).astype(np.float32)
    np.testing.assert_allclose(run_numpy_reference(model, [x])[0], run_onnxruntime(original, [x])[0], rtol=RTOL, atol=ATOL)


# ---- compiled, registry, reports --------------------------------------------------------------


def test_packed_chain_compiles_for_x86_and_verifies(tmp_path):
    model = edgec.from_onnx_ir(chain_model())
    reports = edgec.apply(model, [PackBlockSparsePass(n=4, sparsity=0.5)])
    assert reports[0].modified and reports[0].max_abs_deviation is not None  # NumPy reference measured it
    result = edgec.compile(model, "x86", tmp_path / "a")
    verification = result.manifest["verification"]
    assert verification["status"] == "passed" and verification["numpy"]["enforced"]
    assert verification["numpy"]["max_abs"] <= 1e-4 + 1e-4 * np.abs(run_numpy_reference(model.graph, [np.zeros((1, 8, 7, 7), np.float32)])[0]).max()
    kernels = [call["kernel"] for call in result.manifest["kernels"]]
    assert sum(name.startswith("edgec_block_sparse") for name in kernels) == 3  # conv1, conv2, fc (12 = 3 blocks of 4)


def test_registered_and_configurable_from_the_command_line():
    assert PackBlockSparsePass in PASSES
    configured = parse("block-sparse:n=8,sparsity=0.7,rearrange=false,kinds=pointwise+gemm,pack=false")
    assert configured == PackBlockSparsePass(n=8, sparsity=0.7, rearrange=False, kinds=("pointwise", "gemm"), pack=False)
    with pytest.raises(ValueError, match="sparsity"):
        PackBlockSparsePass(sparsity=1.0)
    with pytest.raises(ValueError, match="unknown layer kind"):
        PackBlockSparsePass(kinds=("depthwise",))


# ---- accuracy on scikit-learn's digits --------------------------------------------------------


def _bench():
    """bench/blocksparse.py as a module. Its sibling imports (``models``, ``timing``) are bench/'s,
    while tests/models.py holds the name ``models`` in this process: bench/ goes first on the
    path and the tests' module is put back afterwards."""
    bench = str(Path(__file__).parents[2] / "bench")
    spec = importlib.util.spec_from_file_location("blocksparse_bench", Path(bench) / "blocksparse.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    tests_models = sys.modules.pop("models", None)
    sys.path.insert(0, bench)
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(bench)
        sys.modules.pop("models", None)
        if tests_models is not None:
            sys.modules["models"] = tests_models
    return module


@pytest.fixture(scope="module")
def digits_results(tmp_path_factory):
    """The digits CNN (bench/blocksparse.py) trained 10 epochs, pruned at 50%, N=4, with and without
    rearrangement (first conv and classifier dense, as in the paper), each fine-tuned 3 epochs
    with its mask, then packed (about 15 s on two idle cores)."""
    pytest.importorskip("sklearn")
    return _bench().digits_accuracy((0.5,), 4, tmp_path_factory.mktemp("digits"), epochs=10, finetune=3)


def test_digits_accuracy_with_and_without_rearrangement(digits_results):
    """Thresholds and why: the dense CNN reaches >= 0.95 on the 540 held-out digits (0.98-0.99
    with this seed); at 50% block sparsity, fine-tuned, >= 0.93 either way (0.965 plain, 0.978
    rearranged with this seed). One run says little: over 20 seeds (bench/blocksparse.py
    --parts accuracy) rearranged minus plain was +0.3 +- 0.3 points at 50% and +0.3 +- 0.5 at
    70%, per seed from -2 to +4 points. So this bound is a regression guard: rearranged within
    3% (16 of 540 images) of plain; a broken permutation drops accuracy to chance. The packed
    model (NumPy references of the custom ops) scores what the fine-tuned dense model scores."""
    dense = digits_results["dense"]
    plain, rearranged = digits_results[(0.5, False)], digits_results[(0.5, True)]
    assert dense >= 0.95
    assert plain["fine-tuned"] >= 0.93 and rearranged["fine-tuned"] >= 0.93
    assert rearranged["fine-tuned"] >= plain["fine-tuned"] - 0.03
    assert rearranged["packed"] == pytest.approx(rearranged["fine-tuned"], abs=1 / 540 + 1e-9)
    assert plain["packed"] == pytest.approx(plain["fine-tuned"], abs=1 / 540 + 1e-9)


def test_rearrangement_keeps_more_weight_mass():
    """With filters rearranged, the kept blocks hold at least as much of the layer's L1 mass as
    without (seeded weights, filter scales spread: rearranged, 7-9 points more of the mass is
    kept, 0.71 -> 0.78, 0.64 -> 0.72, 0.69 -> 0.78)."""
    rng = np.random.default_rng(7)
    for shape in ((32, 16, 1, 1), (64, 32, 3, 3), (48, 96)):
        scales = rng.lognormal(0, 0.7, (shape[0],) + (1,) * (len(shape) - 1))
        weight = (rng.standard_normal(shape) * scales).astype(np.float32)
        kept = {}
        for rearrange in (False, True):
            decision = block_sparsify(weight, 4, 0.5, rearrange)
            norms = block_norms(weight[decision.perm], 4)
            kept[rearrange] = norms[decision.keep].sum() / norms.sum()
        assert kept[True] >= kept[False] + 0.03
