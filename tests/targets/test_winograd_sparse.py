"""Block-sparse Winograd convolutions (issue 14, targets/schedules/winograd_sparse.py): the
weight transform keeps a 1xN block pattern (a pruned block is zero after it), the policy's
density, the rewrite's structure (3x3 stride-1 BlockSparseConv kernels only: input
transform, a GEMM over the kept blocks, the output transform fused with bias and
activation), compiled numerics against ONNX Runtime on the dense equivalent (x86) and on
an emulated cortex-a7 board, and the fallback to the direct kernel. No timing assertions.
"""

from __future__ import annotations

import numpy as np
import pytest

import edgec
from edgec.ops.block_sparse.format import unpack_blocks
from edgec.runtimes.local import LocalRunner
from edgec.runtimes.reference import run_numpy_reference, run_onnxruntime
from edgec.targets import PRESETS
from edgec.targets.schedules import winograd_kernels, winograd_sparse
from edgec.targets.schedules.winograd import tile_counts, transform_weights
from edgec.targets.schedules.winograd_graph import WinogradPolicy
from backbone import assert_board_verified
from sparse_graphs import block_sparse_conv, conv_models, graph, random_blocks, tensor

RTOL = ATOL = 1e-4  # the dense Winograd convolutions' tolerance (test_winograd.py)
F2 = WinogradPolicy(tiles=(2,), min_tiles=1)
F4 = WinogradPolicy(tiles=(4,), min_tiles=1)
F6 = WinogradPolicy(tiles=(6,), min_tiles=1)


def _kernels(manifest) -> dict[str, dict]:
    return {call["kernel"]: call for call in manifest["kernels"]}


@pytest.mark.parametrize("m", [2, 4, 6])
def test_transform_keeps_the_block_pattern(m):
    """U of the unpacked weight, per tile element, is the unpacked U of the kept blocks:
    pruned blocks stay exactly zero and the CSR pattern is the convolution's."""
    rng = np.random.default_rng(m)
    values, indices, indptr = random_blocks(rng, 16, 12, 4, (3, 3))
    dense_hwio = unpack_blocks(values, indices, indptr, 12).transpose(2, 3, 1, 0)  # (3, 3, C, F)
    dense_u = transform_weights(dense_hwio.astype(np.float64), m)  # (alpha^2, C, F)
    block_u = transform_weights(values.transpose(2, 3, 0, 1).astype(np.float64), m)  # (alpha^2, nnz, N)
    for t in range(dense_u.shape[0]):
        np.testing.assert_allclose(unpack_blocks(block_u[t], indices, indptr, 12).T, dense_u[t], rtol=1e-12, atol=1e-12)
    kept = unpack_blocks(np.ones((indices.size, 4)), indices, indptr, 12).T > 0  # (C, F)
    assert not dense_u[:, ~kept].any()


def test_policy_density_scales_the_gemm_and_direct_costs():
    policy = WinogradPolicy(tiles=(4,), min_tiles=1, transform_cost=2.0)
    dense = policy.estimated_cost(4, 1, 56, 56, 64, 64)
    sparse = policy.estimated_cost(4, 1, 56, 56, 64, 64, density=0.3)
    transforms = policy.estimated_cost(4, 1, 56, 56, 64, 64, density=0.0)
    assert transforms > 0 and sparse - transforms == pytest.approx(0.3 * (dense - transforms))
    # transforms cost the same sparse or not: at a low enough density direct convolution wins
    assert policy.choose(1, 56, 56, 64, 64, 0.3)[0] == 4
    m, reason = policy.choose(1, 56, 56, 64, 64, 0.02)
    assert m is None and "direct" in reason


def two_layer_model():
    """x (1, 16, 10, 11) -> 3x3 stride 1 (Relu) -> 3x3 stride 2: only the first can be Winograd."""
    rng = np.random.default_rng(4)
    inits, nodes, channels = [], [], 16
    for name, strides, activation in (("a", (1, 1), "Relu"), ("b", (2, 2), "none")):
        blocks = random_blocks(rng, 32, channels, 4, (3, 3))
        bias = rng.standard_normal(32).astype(np.float32)
        node, node_inits = block_sparse_conv(name, "x" if name == "a" else "a", (*blocks, bias), activation=activation,
                                             strides=list(strides), pads=[1, 1, 1, 1])  # fmt: skip
        nodes.append(node)
        inits += node_inits
        channels = 32
    return graph(nodes, [tensor("x", (1, 16, 10, 11))], [tensor("b", (1, 32, 5, 6))], inits)


def test_rewrite_takes_the_stride_1_convolution_only(tmp_path):
    model = two_layer_model()
    result = edgec.compile(edgec.from_onnx_ir(model), "x86", tmp_path / "out", winograd=F4)
    manifest = result.manifest
    assert manifest["verification"]["status"] == "passed"
    assert manifest["schedules"]["fallbacks"] == []
    kernels = _kernels(manifest)
    assert kernels[winograd_kernels.INPUT_KERNEL]["schedule"] == "winograd-transform"
    gemm = kernels[winograd_sparse.GEMM_KERNEL]
    assert gemm["schedule"] == "custom-op"
    outputs = [name for name in kernels if name.startswith(f"fused_{winograd_sparse.OUTPUT_KERNEL}")]
    assert len(outputs) == 1 and outputs[0].endswith("relu") and "add" in outputs[0]  # bias + activation fused
    assert kernels[outputs[0]]["schedule"] == "winograd-transform"
    assert [name for name in kernels if name.startswith("edgec_block_sparse_conv")] == ["edgec_block_sparse_conv1"]
    # the GEMM's work: alpha^2 x tiles x the kept blocks' N, read from the packed arrays it is given
    nnz = int(np.asarray(model.graph.initializers["a_i"].const_value.numpy()).size)
    assert gemm["flops"] == 2 * 36 * int(np.prod(tile_counts(10, 11, 4))) * nnz * 4
    x = np.random.default_rng(1).standard_normal((1, 16, 10, 11)).astype(np.float32)
    got = LocalRunner(result.artifact).run([x])[0]
    np.testing.assert_allclose(got, run_numpy_reference(model, [x])[0], rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("policy", [F2, F4, F6], ids=["F2x2", "F4x4", "F6x6"])
@pytest.mark.parametrize(("size", "pads", "activation"), [((13, 14), (1, 1, 1, 1), "Relu"), ((12, 9), (0, 1, 2, 0), "Clip"),
                                                          ((8, 8), (0, 0, 0, 0), "none")])  # fmt: skip
def test_compiled_matches_onnxruntime_on_the_dense_equivalent(policy, size, pads, activation, tmp_path):
    """Partial last tiles (13x14 at F(4x4), F(6x6)), asymmetric padding, each activation."""
    sparse, dense = conv_models((1, 16, *size), 32, 4, (3, 3), (1, 1), pads, (1, 1), activation, seed=len(pads) + size[0])
    result = edgec.compile(edgec.from_onnx_ir(sparse), "x86", tmp_path / "out", winograd=policy)
    assert winograd_sparse.GEMM_KERNEL in _kernels(result.manifest)
    assert not any(name.startswith("edgec_block_sparse_conv") for name in _kernels(result.manifest))
    x = np.random.default_rng(2).standard_normal((1, 16, *size)).astype(np.float32)
    got = LocalRunner(result.artifact).run([x])[0]
    np.testing.assert_allclose(got, run_onnxruntime(dense, [x])[0], rtol=RTOL, atol=ATOL)


def test_without_winograd_the_direct_kernels_stay(tmp_path):
    result = edgec.compile(edgec.from_onnx_ir(two_layer_model()), "x86", tmp_path / "out", winograd=None)
    kernels = _kernels(result.manifest)
    assert not any("winograd" in name for name in kernels)
    assert sum(name.startswith("edgec_block_sparse_conv") for name in kernels) == 2


def test_failing_rewrite_keeps_the_direct_kernel(tmp_path, monkeypatch):
    from edgec.ops.block_sparse import winograd_gemm

    def broken(*_args, **_kwargs):
        raise RuntimeError("no kernel today")

    monkeypatch.setattr(winograd_gemm, "winograd_gemm", broken)
    result = edgec.compile(edgec.from_onnx_ir(two_layer_model()), "x86", tmp_path / "out", winograd=F4)
    manifest = result.manifest
    assert manifest["verification"]["status"] == "passed"
    assert [record["rule"] for record in manifest["schedules"]["fallbacks"]] == [winograd_sparse.RULE]
    assert "no kernel today" in manifest["schedules"]["fallbacks"][0]["reason"]
    kernels = _kernels(manifest)
    assert not any("winograd" in name for name in kernels)
    assert sum(name.startswith("edgec_block_sparse_conv") for name in kernels) == 2


def test_cortex_a7_build_verifies_on_the_emulated_board(tmp_path):
    """Compile verification runs the armv7 build on the board under qemu, against the references."""
    preset = PRESETS["cortex-a7"]
    import shutil

    if shutil.which(preset.toolchain.compiler) is None:
        pytest.skip(f"{preset.toolchain.compiler} is not installed (make toolchains)")
    result = edgec.compile(edgec.from_onnx_ir(two_layer_model()), "cortex-a7", tmp_path / "a7", winograd=F4)
    assert_board_verified(result.manifest, "cortex-a7")
    kernels = _kernels(result.manifest)
    assert kernels[winograd_sparse.GEMM_KERNEL]["schedule"] == "custom-op"
    assert result.manifest["schedules"]["fallbacks"] == []
