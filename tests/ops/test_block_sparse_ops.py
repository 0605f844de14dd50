"""edgec.BlockSparseConv / edgec.BlockSparseGemm: the packed format, the NumPy references
against dense ONNX Runtime, the compiled x86 kernels against the references (rtol 1e-4,
atol 1e-5), that the kernels' work scales with the kept blocks, the transposes around the
channels-last kernels cancel, ARM cross-compiles (and runs under qemu, slow), CUDA decodes
to dense with a warning."""

from __future__ import annotations

import logging

import numpy as np
import onnx_ir as ir
import pytest
from onnx import helper, numpy_helper

import edgec
from edgec.ops import DOMAIN, load_all
from edgec.ops.block_sparse.format import unpack_blocks
from edgec.ops.block_sparse.kernels import ConvShape, conv_kernel, kernel_plan
from edgec.targets.vector import CpuVector, cpu_vector
from backbone import assert_board_verified, assert_profile_adds_up
from sparse_graphs import block_sparse_conv, conv_models, graph, random_blocks, tensor
from edgec.runtimes.reference import run_numpy_reference, run_onnxruntime

RTOL, ATOL = 1e-4, 1e-5  # float32 sums of up to a few hundred products, in another order
AVX512 = CpuVector(lanes=16, registers=32)


ACTIVATIONS = {"none": [], "Relu": ["Relu"], "Clip": ["Clip"]}


CONV_CASES = {
    "pointwise": ((1, 16, 7, 9), 32, 4, (1, 1), (1, 1), (0, 0, 0, 0), (1, 1), "Clip"),
    "pointwise-n16-batch2": ((2, 24, 5, 5), 48, 16, (1, 1), (1, 1), (0, 0, 0, 0), (1, 1), "none"),
    "3x3-pad": ((1, 8, 9, 11), 16, 4, (3, 3), (1, 1), (1, 1, 1, 1), (1, 1), "Relu"),
    "3x3-stride2": ((2, 8, 12, 13), 16, 8, (3, 3), (2, 2), (1, 1, 1, 1), (1, 1), "none"),
    "5x3-dilated-asym-pad": ((1, 6, 14, 12), 8, 4, (5, 3), (1, 2), (2, 1, 2, 0), (2, 1), "Clip"),
    "1x1-stride2": ((1, 8, 12, 12), 16, 4, (1, 1), (2, 2), (0, 0, 0, 0), (1, 1), "Relu"),
}


def test_pack_layout_round_trip():
    from edgec.passes.pack_block_sparse import pack_blocks

    rng = np.random.default_rng(0)
    values, indices, indptr = random_blocks(rng, 12, 5, 4, (3, 3))
    weight = unpack_blocks(values, indices, indptr, 5)
    assert weight.shape == (12, 5, 3, 3)
    keep = np.zeros((3, 5), bool)
    keep[np.repeat(np.arange(3), np.diff(indptr)), indices] = True
    again = pack_blocks(weight, keep, 4)
    for got, want in zip(again, (values, indices, indptr), strict=True):
        np.testing.assert_array_equal(got, want)
    with pytest.raises(ValueError, match="inconsistent"):
        unpack_blocks(values, indices[:-1], indptr, 5)


@pytest.mark.parametrize("case", CONV_CASES)
def test_conv_reference_equals_dense_onnxruntime(case):
    x_shape, *rest = CONV_CASES[case]
    sparse, dense = conv_models(x_shape, *rest)
    x = np.random.default_rng(1).standard_normal(x_shape).astype(np.float32)
    (got,) = run_numpy_reference(sparse, [x])
    (want,) = run_onnxruntime(dense, [x])
    np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("case", ["pointwise", "pointwise-n16-batch2", "3x3-pad", "3x3-stride2", "5x3-dilated-asym-pad"])
def test_conv_compiled_x86_equals_reference(case, tmp_path):
    x_shape, *rest = CONV_CASES[case]
    sparse, _ = conv_models(x_shape, *rest)
    result = edgec.compile(edgec.from_onnx_ir(sparse), "x86", tmp_path / "a")
    verification = result.manifest["verification"]
    assert verification["status"] == "passed" and verification["numpy"]["enforced"]
    assert verification["rtol"] == 1e-4 and verification["numpy"]["max_abs"] < 1e-4
    calls = [call for call in result.manifest["kernels"] if call["kernel"].startswith("edgec_block_sparse_conv")]
    assert len(calls) == 1
    nnz = sparse.graph.initializers["i"].const_value.numpy().size
    out = result.manifest["outputs"][0]["shape"]
    kh, kw = rest[2]
    assert calls[0]["flops"] == 2 * nnz * rest[1] * kh * kw * out[0] * out[2] * out[3]  # declared: the kept blocks' work


def gemm_models(rows: int, features: int, out_features: int, n: int, activation: str, seed=0):
    rng = np.random.default_rng(seed)
    values, indices, indptr = random_blocks(rng, out_features, features, n, ())
    values = values.reshape(-1, n)
    bias = rng.standard_normal(out_features).astype(np.float32)
    weight = unpack_blocks(values, indices, indptr, features)
    inits = [numpy_helper.from_array(a, name) for a, name in ((values, "v"), (indices, "i"), (indptr, "p"), (bias, "b"))]
    sparse = graph(
        [helper.make_node("BlockSparseGemm", ["x", "v", "i", "p", "b"], ["y"], domain=DOMAIN, block_size=n, activation=activation)],
        [tensor("x", (rows, features))],
        [tensor("y", (rows, out_features))],
        inits,
    )
    nodes = [helper.make_node("Gemm", ["x", "w", "b"], ["g" if activation == "Relu" else "y"], transB=1)]
    if activation == "Relu":
        nodes.append(helper.make_node("Relu", ["g"], ["y"]))
    dense = graph(
        nodes,
        [tensor("x", (rows, features))],
        [tensor("y", (rows, out_features))],
        [numpy_helper.from_array(weight, "w"), numpy_helper.from_array(bias, "b")],
    )
    return sparse, dense


@pytest.mark.parametrize(("rows", "n", "activation"), [(1, 4, "Relu"), (3, 16, "none")])
def test_gemm_reference_and_compiled(rows, n, activation, tmp_path):
    sparse, dense = gemm_models(rows, 40, 32, n, activation)
    x = np.random.default_rng(2).standard_normal((rows, 40)).astype(np.float32)
    np.testing.assert_allclose(run_numpy_reference(sparse, [x])[0], run_onnxruntime(dense, [x])[0], rtol=RTOL, atol=ATOL)
    result = edgec.compile(edgec.from_onnx_ir(sparse), "x86", tmp_path / "a")
    assert result.manifest["verification"]["numpy"]["max_abs"] < 1e-4
    assert any(call["kernel"].startswith("edgec_block_sparse_gemm") for call in result.manifest["kernels"])


# ---- the kernel's work scales with the kept blocks ------------------------------------------


def multiply_adds(prim, arrays: dict[str, np.ndarray]) -> int:
    """Multiply-adds the kernel executes: runs of ``acc[...] = acc[...] + w * x`` per vector lane,
    counted by walking the loop nest with the loop bounds evaluated on the actual ``indptr``.

    ``estimate_tir_flops`` cannot do this: the reduction bounds are data (indptr[b] .. indptr[b+1]).
    """
    import tvm
    from tvm import tirx

    def value(expr, env):
        if isinstance(expr, tirx.IntImm):
            return int(expr.value)
        if isinstance(expr, tirx.Var):
            return env[expr]
        if isinstance(expr, tirx.Cast):
            return value(expr.value, env)
        binary = {tirx.Add: int.__add__, tirx.Sub: int.__sub__, tirx.Mul: int.__mul__, tirx.FloorDiv: int.__floordiv__,
                  tirx.FloorMod: int.__mod__, tirx.Min: min, tirx.Max: max}  # fmt: skip
        binary.update({tirx.LT: int.__lt__, tirx.LE: int.__le__, tirx.GT: int.__gt__, tirx.GE: int.__ge__,
                       tirx.EQ: int.__eq__, tirx.NE: int.__ne__, tirx.And: lambda a, b: a and b, tirx.Or: lambda a, b: a or b})  # fmt: skip
        for kind, function in binary.items():
            if isinstance(expr, kind):
                return function(value(expr.a, env), value(expr.b, env))
        if isinstance(expr, tvm.ir.TensorLoad):  # a load of indptr / indices
            return int(arrays[expr.source.name][tuple(value(index, env) for index in expr.indices)])
        raise TypeError(f"cannot evaluate {type(expr).__name__}: {expr}")

    def count(stmt, env) -> int:
        if isinstance(stmt, tirx.For):
            start, extent = value(stmt.min, env), value(stmt.extent, env)
            return sum(count(stmt.body, {**env, stmt.loop_var: i}) for i in range(start, start + extent))
        if isinstance(stmt, tirx.SeqStmt):
            return sum(count(item, env) for item in stmt.seq)
        if isinstance(stmt, tirx.IfThenElse):
            branch = stmt.then_case if value(stmt.condition, env) else stmt.else_case
            return 0 if branch is None else count(branch, env)
        if isinstance(stmt, tirx.BufferStore):
            return int(stmt.buffer.name == "acc" and isinstance(stmt.value, tirx.Add))
        body = getattr(stmt, "body", None)
        return 0 if body is None else count(body, env)

    return count(prim.body, {})


@pytest.mark.parametrize("kernel", [(1, 1), (3, 3)])
def test_kernel_work_scales_with_kept_blocks(kernel):
    rng = np.random.default_rng(0)
    out_channels, channels, n = 16, 24, 4
    blocks = out_channels // n * channels
    counts = {}
    for keep in (0.25, 0.75):
        mask = np.zeros(blocks, bool)
        mask[rng.permutation(blocks)[: int(keep * blocks)]] = True
        mask = mask.reshape(out_channels // n, channels)
        indptr = np.concatenate([[0], np.cumsum(mask.sum(1))]).astype(np.int32)
        indices = np.nonzero(mask)[1].astype(np.int32)
        pads = (1, 1, 1, 1) if kernel == (3, 3) else (0, 0, 0, 0)
        shape = ConvShape(1, channels, 6, 5, kernel, (1, 1), pads, (1, 1), blocks=out_channels // n, block_size=n, nnz=indices.size)
        prim = conv_kernel(shape, kernel_plan(n, 30, AVX512), "Relu")
        counts[keep] = multiply_adds(prim, {"indptr": indptr, "indices": indices})
        # exactly the kept blocks' work: nnz * N * kh * kw per output position, nothing for pruned blocks
        assert counts[keep] == indices.size * n * kernel[0] * kernel[1] * 6 * 5 == shape.multiply_adds
    assert counts[0.75] == 3 * counts[0.25]


# ---- layout: the channels-last wrappers cancel ----------------------------------------------


def test_transposes_around_sparse_ops_cancel(tmp_path):
    """pointwise (sparse) -> depthwise (dense, NHWC) -> pointwise (sparse) -> residual Add: no transposes inside."""
    rng = np.random.default_rng(0)
    channels = 16
    nodes, inits = [], []
    for index, source in enumerate(["x", "dw"]):
        arrays = (*random_blocks(rng, channels, channels, 4), np.zeros(channels, np.float32))
        node, node_inits = block_sparse_conv(f"pw{index}", source, arrays, activation="Relu")
        nodes.append(node)
        inits += node_inits
        if index == 0:
            inits.append(numpy_helper.from_array(rng.standard_normal((channels, 1, 3, 3)).astype(np.float32), "dww"))
            nodes.append(helper.make_node("Conv", ["pw0", "dww"], ["dw"], group=channels, pads=[1, 1, 1, 1]))
    nodes.append(helper.make_node("Add", ["pw1", "pw0"], ["y"]))
    model = graph(nodes, [tensor("x", (1, channels, 8, 8))], [tensor("y", (1, channels, 8, 8))], inits)
    result = edgec.compile(edgec.from_onnx_ir(model), "x86", tmp_path / "a")
    assert result.manifest["verification"]["status"] == "passed"
    kernels = [call["kernel"] for call in result.manifest["kernels"]]
    transposes = [name for name in kernels if "transpose" in name]
    assert len(transposes) == 2, kernels  # the graph's input and output only


def test_pruned_everywhere_pools_channels_last(tmp_path):
    """sparse stem -> max pool -> sparse conv -> residual Add with the pool's output: no dense
    convolution for the layout pass to start from; the pool runs NHWC and the only transposes are
    the graph's input and output (before cancel_transposes' pooling rule, a model like this ran
    its pool NCHW between transposes)."""
    rng = np.random.default_rng(0)
    channels, nodes, inits = 8, [], []
    for index, (source, out) in enumerate([("x", "stem"), ("pool", "conv")]):
        blocks = random_blocks(rng, channels, 4 if index == 0 else channels, 4, (3, 3), keep=0.6)
        node, node_inits = block_sparse_conv(out, source, (*blocks, np.zeros(channels, np.float32)), activation="Relu", pads=[1, 1, 1, 1])
        nodes.append(node)
        inits += node_inits
        if index == 0:
            nodes.append(helper.make_node("MaxPool", ["stem"], ["pool"], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1]))
    nodes.append(helper.make_node("Add", ["conv", "pool"], ["y"]))
    model = graph(nodes, [tensor("x", (1, 4, 12, 12))], [tensor("y", (1, channels, 6, 6))], inits)
    result = edgec.compile(edgec.from_onnx_ir(model), "x86", tmp_path / "a")
    assert result.manifest["verification"]["status"] == "passed"
    kernels = [call["kernel"] for call in result.manifest["kernels"]]
    assert len([name for name in kernels if "transpose" in name]) == 2, kernels  # the graph's input and output only


def test_cancel_transposes_rules():
    from tvm import relax

    from edgec.ops.transposes import cancel_transposes

    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((1, 4, 5, 6), "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            a = bb.emit(relax.op.permute_dims(x, [0, 2, 3, 1]))
            b = bb.emit(relax.op.permute_dims(a, [0, 3, 1, 2]))  # inverse: back to x
            c = bb.emit(relax.op.permute_dims(x, [0, 2, 3, 1]))
            d = bb.emit(relax.op.add(a, c))  # both operands permuted alike: sinks below the add
            e = bb.emit(relax.op.permute_dims(d, [0, 3, 1, 2]))  # cancels the sunk permute
            out = bb.emit_output(relax.op.multiply(b, e))
        bb.emit_func_output(out)
    mod = cancel_transposes()(bb.get())
    text = mod["main"].script()
    assert "permute_dims" not in text, text


def test_cancel_transposes_leaves_other_pools():
    """A pool of an unpermuted tensor, of one permuted by other axes, or already NHWC stays as it is."""
    import tvm
    from tvm import relax

    from edgec.ops.transposes import cancel_transposes

    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((1, 9, 11, 8), "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            plain = bb.emit(relax.op.nn.max_pool2d(x, (3, 3), (2, 2), (1, 1, 1, 1)))
            swapped = bb.emit(relax.op.nn.avg_pool2d(relax.op.permute_dims(x, [0, 1, 3, 2]), (2, 2)))
            channels_last = bb.emit(relax.op.nn.max_pool2d(relax.op.permute_dims(x, [0, 2, 3, 1]), (2, 2), layout="NHWC"))
            out = bb.emit_output(relax.Tuple([plain, swapped, channels_last]))
        bb.emit_func_output(out)
    before = bb.get()
    after = cancel_transposes()(before.clone())
    assert relax.analysis.check_well_formed(after)
    tvm.ir.assert_structural_equal(after, before)


def test_cancel_transposes_moves_pools_channels_last():
    """An NCHW pooling of an NHWC tensor permuted to NCHW (a region of custom ops only) becomes
    the NHWC pooling: the permutes left are the graph's own, the output is unchanged."""
    import tvm
    from tvm import relax

    from edgec.ops.transposes import cancel_transposes

    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((1, 9, 11, 8), "float32"))  # NHWC, as a custom op's output
    with bb.function("main", [x]):
        with bb.dataflow():
            nchw = bb.emit(relax.op.permute_dims(x, [0, 3, 1, 2]))
            pooled = bb.emit(relax.op.nn.max_pool2d(nchw, (3, 3), (2, 2), (1, 1, 1, 1)))
            residual = bb.emit(relax.op.nn.relu(relax.op.add(pooled, pooled)))
            back = bb.emit(relax.op.permute_dims(residual, [0, 2, 3, 1]))  # into the next custom op: cancels
            average = bb.emit(relax.op.nn.avg_pool2d(nchw, (2, 3), (1, 2), (1, 0, 0, 1), (1, 2), ceil_mode=True, count_include_pad=True))
            adaptive = bb.emit(relax.op.nn.adaptive_avg_pool2d(nchw, (1, 1)))
            out = bb.emit_output(relax.Tuple([back, average, adaptive]))
        bb.emit_func_output(out)
    before = bb.get()
    after = cancel_transposes()(before.clone())
    assert relax.analysis.check_well_formed(after)
    text = after["main"].script()
    assert text.count(', layout="NHWC"') == 3 and 'layout="NCHW"' not in text, text
    assert text.count("permute_dims") == 2, text  # the outputs of the two NCHW pools; none in front of `back`
    data = np.random.default_rng(0).standard_normal((1, 9, 11, 8)).astype(np.float32)
    results = []
    for mod in (before, after):
        vm = relax.VirtualMachine(tvm.compile(mod, target="llvm"), tvm.cpu())
        results.append([value.numpy() for value in vm["main"](tvm.runtime.tensor(data))])
    for got, want in zip(*results, strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


# ---- targets ------------------------------------------------------------------------------


def test_vector_shape_per_target():
    from edgec.targets import resolve

    armv7, aarch64, x86 = (cpu_vector(resolve(name)) for name in ("cortex-a7", "cortex-a53", "x86"))
    assert (armv7.lanes, armv7.registers) == (4, 16)
    assert (aarch64.lanes, aarch64.registers) == (4, 32)
    assert x86.lanes in (4, 8, 16) and x86.registers in (16, 32)
    plan = kernel_plan(4, 3136, armv7)  # NEON armv7: 12 accumulators of one quad register each
    assert plan.positions == 12
    assert kernel_plan(8, 3136, AVX512).positions == 24  # AVX-512: one (half) zmm per position
    assert kernel_plan(16, 3136, AVX512).positions == 15  # 15 x 16 floats: the tile stays under 1 KiB


@pytest.mark.parametrize("n", [4, 16])
def test_accumulators_are_not_heap_allocated(n):
    """TVM turns a kernel buffer of 1 KiB or more into a TVMBackendAllocWorkspace call per
    parallel task (and LLVM then keeps the tile in memory): the plan keeps it smaller."""
    import tvm

    shape = ConvShape(1, 32, 28, 28, (1, 1), blocks=192 // n, block_size=n, nnz=40)
    prim = conv_kernel(shape, kernel_plan(n, 784, AVX512), "Clip", 0.0, 6.0)
    module = tvm.IRModule({"main": prim.with_attr("global_symbol", "main")})
    llvm_ir = tvm.compile(module, target=tvm.target.Target({"kind": "llvm", "mcpu": "skylake-avx512"})).mod.inspect_source("ll")
    assert "define" in llvm_ir and "load ptr, ptr @__TVMBackendAllocWorkspace" not in llvm_ir


def test_blocks_narrower_than_the_vector_warn_once(caplog):
    from edgec.ops.block_sparse.lowering import _warn_narrow_blocks, warn_narrow_blocks
    from edgec.targets import resolve

    _warn_narrow_blocks.cache_clear()
    a53 = resolve("cortex-a53")
    with caplog.at_level(logging.WARNING, logger="edgec.ops.block_sparse.lowering"):
        warn_narrow_blocks(a53, 4, 4)  # N fills a NEON register: nothing to say
        assert not caplog.records
        for _ in range(3):
            warn_narrow_blocks(a53, 4, 16)
    assert len(caplog.records) == 1
    assert "N=4 on cortex-a53" in caplog.text and "4 of the CPU's 16 float lanes" in caplog.text
    assert "prune with n=16" in caplog.text


def small_sparse_model(activation: str = "Relu") -> ir.Model:
    sparse, _ = conv_models((1, 8, 6, 6), 16, 4, (3, 3), (1, 1), (1, 1, 1, 1), (1, 1), activation)
    return sparse


@pytest.mark.parametrize("preset", ["cortex-a7", "cortex-a53"])
def test_arm_cross_compiles(preset, tmp_path):
    result = edgec.compile(edgec.from_onnx_ir(small_sparse_model()), preset, tmp_path / preset)
    lib = (tmp_path / preset / "lib.so").read_bytes()
    machine = int.from_bytes(lib[18:20], "little")
    assert machine == {"cortex-a7": 40, "cortex-a53": 183}[preset]  # EM_ARM, EM_AARCH64
    assert_board_verified(result.manifest, preset)
    sparse = [call for call in result.manifest["kernels"] if call["kernel"].startswith("edgec_block_sparse_conv")]
    assert sparse and all(call["schedule"] == "custom-op" for call in sparse)
    assert result.manifest["schedules"]["by_rule"]["custom-op"] >= 1


@pytest.mark.slow
@pytest.mark.parametrize("preset", ["cortex-a7", "cortex-a53"])
def test_arm_runs_under_qemu_like_reference(preset, tmp_path):
    """Runs lib.so on an emulated board (edgec-agent under qemu-user, built or cached) over RPC."""
    import tvm
    from tvm import relax, rpc

    from edgec.runtimes.agent_build import build_agent
    from edgec.runtimes.emulate import emulate

    model = small_sparse_model()
    result = edgec.compile(edgec.from_onnx_ir(model), preset, tmp_path / preset)
    x = np.random.default_rng(3).standard_normal((1, 8, 6, 6)).astype(np.float32)
    (want,) = run_numpy_reference(model, [x])
    agent = emulate(preset, agent=build_agent(preset), timeout=120)
    try:
        remote = rpc.connect(agent.host, agent.port)
        remote.upload(str(result.artifact.path / "lib.so"))
        dev = remote.cpu()
        vm = relax.VirtualMachine(remote.load_module("lib.so"), dev)
        vm.set_input("main", tvm.runtime.tensor(x, dev))
        vm.invoke_stateful("main")
        got = vm.get_outputs("main").numpy()
    finally:
        agent.stop()
    np.testing.assert_allclose(got, want, rtol=RTOL, atol=1e-4)


@pytest.mark.parametrize("activation", ["Relu", "Clip"])
def test_cuda_decodes_to_dense_with_warning(caplog, activation):
    from edgec.lower import to_relax
    from edgec.targets import resolve

    with caplog.at_level(logging.WARNING, logger="edgec.ops.block_sparse.lowering"):
        mod = to_relax(small_sparse_model(activation), resolve("cuda"))
    assert "decoded to a dense conv2d" in caplog.text
    script = mod["main"].script()
    assert "conv2d" in script and "call_tir" not in script
    assert ("clip" if activation == "Clip" else "relu") in script


def test_ops_registered():
    ops = load_all()
    assert {"BlockSparseConv", "BlockSparseGemm"} <= set(ops)


def test_profile_times_the_sparse_kernel_with_its_real_indices(tmp_path):
    """The kernel's work depends on its index arrays: profile must feed the stored ones, not zeros."""
    from edgec.runtimes.profile import kernel_constants, kernel_arguments, profile
    from edgec.runtimes.session import LocalDevice

    sparse, _ = conv_models((1, 96, 56, 56), 192, 4, (1, 1), (1, 1), (0, 0, 0, 0), (1, 1), "Relu")
    artifact = edgec.compile(edgec.from_onnx_ir(sparse), "x86", tmp_path / "a").artifact
    (call,) = [call for call in artifact.manifest["kernels"] if call["kernel"].startswith("edgec_block_sparse_conv")]
    keys = [spec["constant"] for spec in call["args"] if "constant" in spec]
    assert len(keys) == 2 and "kernel_constants.npz" in artifact.manifest["files"]
    with np.load(artifact.path / "kernel_constants.npz") as stored:
        indices, indptr = (stored[key] for key in keys)
    assert indptr[-1] == len(indices) > 0 and (np.diff(indptr) >= 0).all()
    fed = kernel_arguments(call, kernel_constants(artifact), np.random.default_rng(0))
    fed_by_key = {spec["constant"]: array for spec, array in zip(call["args"], fed) if "constant" in spec}
    assert all(np.array_equal(fed_by_key[key], stored) for key, stored in zip(keys, (indices, indptr)))
    result = profile(artifact, LocalDevice(), repeat=10)
    assert_profile_adds_up(result.as_dict(), artifact.manifest)
