"""edgec.BinaryConv / BinaryGemm / TernaryConv / TernaryGemm: format, NumPy references,
compiled kernels against them, ARM cross-compiles and runs under qemu.

One graph holds every variant (binary activations with both encodings and
binarisations, strides, dilation, asymmetric padding, batch 2, 70 input
channels = two 64-bit words with a tail; the fused epilogue; weight-only and
ternary layers, grouped too; the Gemms), so each target compiles once.
Binary-activation variants with ``scale = 1`` and ``bias = 0`` output the
integer ``dot`` itself: those are compared bit for bit (``array_equal``)
with the NumPy reference and with an independent float64 PyTorch
convolution of ``Sign(x)`` with zero padding; inputs hold exact zeros, so
``Sign(0) = 0`` and the padding are both exercised. Float epilogues and
weight-only layers: rtol 1e-5 (atol 1e-5 x the output's scale).
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import numpy as np
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

import edgec
from edgec.ops import DOMAIN
from edgec.ops.binary.format import pack_bits, unpack_bits, weight_words
from edgec.ops.binary.kernels import ConvShape, pack_kernel, xnor_conv_kernel, xnor_plan
from edgec.ops.binary.reference import binarize
from edgec.ops.ternary.format import ternary_weights
from edgec.runtimes.reference import run_numpy_reference
from edgec.targets.vector import CpuVector, cpu_vector

RTOL = 1e-5
BATCH, CHANNELS, HEIGHT, WIDTH = 2, 70, 9, 11
OUT = 16
GEMM_ROWS, GEMM_DEPTH, GEMM_OUT = 5, 100, 12


# --------------------------------------------------------------------------
# the graph with every variant
# --------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Variant:
    """One BinaryConv with binary activations and unit scale: its output is the integer dot."""

    name: str
    binarize_input: str
    encoding: str
    kernel: tuple[int, int] = (3, 3)
    strides: tuple[int, int] = (1, 1)
    pads: tuple[int, int, int, int] = (1, 1, 1, 1)
    dilations: tuple[int, int] = (1, 1)

    def out_shape(self) -> list[int]:
        shape = ConvShape(BATCH, CHANNELS, HEIGHT, WIDTH, self.kernel, self.strides, self.pads, self.dilations, out_channels=OUT)
        return [BATCH, OUT, shape.out_height, shape.out_width]


EXACT = (
    Variant("sign_sign", "sign", "sign"),
    Variant("ge0_sign", "sign_ge0", "sign"),
    Variant("sign_magnitude", "sign", "magnitude"),
    Variant("ge0_magnitude_stride2", "sign_ge0", "magnitude", strides=(2, 2)),
    Variant("sign_asym_pads_stride2", "sign", "sign", strides=(2, 1), pads=(2, 0, 1, 2)),
    Variant("sign_dilated", "sign", "sign", pads=(2, 2, 2, 2), dilations=(2, 2)),
    Variant("sign_5x3_stride_w2", "sign", "sign", kernel=(5, 3), strides=(1, 2), pads=(2, 1, 2, 1)),
    Variant("ge0_1x1", "sign_ge0", "sign", kernel=(1, 1), pads=(0, 0, 0, 0)),
)
FLOAT_OUTPUTS = (
    "epilogue_relu", "epilogue_clip", "weight_only", "weight_only_magnitude", "ternary", "ternary_grouped",
    "gemm_weight_only", "ternary_gemm",
)  # fmt: skip
EXACT_GEMM = "gemm_binary"


def _inputs(rng) -> tuple[np.ndarray, np.ndarray]:
    x = rng.standard_normal((BATCH, CHANNELS, HEIGHT, WIDTH)).astype(np.float32)
    x[np.abs(x) < 0.25] = 0.0  # about a fifth exact zeros: Sign(0) = 0 matters
    a = rng.standard_normal((GEMM_ROWS, GEMM_DEPTH)).astype(np.float32)
    a[np.abs(a) < 0.25] = 0.0
    return x, a


def build_graph(seed: int = 0) -> ir.Model:
    rng = np.random.default_rng(seed)
    nodes, outputs, inits = [], [], []

    def init(name: str, array: np.ndarray) -> str:
        inits.append(numpy_helper.from_array(np.asarray(array), name))
        return name

    def conv_node(op, name, bits, scale, bias, out_shape, source="x", **attributes):
        inputs = [source, init(f"{name}.bits", bits), init(f"{name}.scale", scale)]
        if bias is not None:
            inputs.append(init(f"{name}.bias", bias))
        nodes.append(helper.make_node(op, inputs, [name], name=name, domain=DOMAIN, **attributes))
        outputs.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, out_shape))

    ones, zeros = np.ones(OUT, np.float32), np.zeros(OUT, np.float32)
    for variant in EXACT:
        bits = pack_bits(rng.integers(0, 2, (OUT, *variant.kernel, CHANNELS)))
        conv_node(
            "BinaryConv", variant.name, bits, ones, zeros, variant.out_shape(),
            encoding=variant.encoding, binarize_input=variant.binarize_input, kernel_shape=list(variant.kernel),
            strides=list(variant.strides), pads=list(variant.pads), dilations=list(variant.dilations),
        )  # fmt: skip
    scale = rng.uniform(0.01, 0.2, OUT).astype(np.float32)
    bias = rng.standard_normal(OUT).astype(np.float32)
    shape3 = [BATCH, OUT, HEIGHT, WIDTH]
    conv3 = {"kernel_shape": [3, 3], "pads": [1, 1, 1, 1]}
    bits3 = lambda: pack_bits(rng.integers(0, 2, (OUT, 3, 3, CHANNELS)))  # noqa: E731
    conv_node("BinaryConv", "epilogue_relu", bits3(), scale, bias, shape3, binarize_input="sign", activation="Relu", **conv3)
    conv_node(
        "BinaryConv", "epilogue_clip", bits3(), scale, bias, shape3, binarize_input="sign_ge0", encoding="magnitude",
        activation="Clip", activation_min=-0.5, activation_max=0.75, **conv3,
    )  # fmt: skip
    conv_node("BinaryConv", "weight_only", bits3(), scale, bias, shape3, **conv3)
    conv_node("BinaryConv", "weight_only_magnitude", bits3(), scale, None, shape3, encoding="magnitude", **conv3)
    conv_node("TernaryConv", "ternary", pack_bits(rng.integers(0, 2, (2, OUT, 3, 3, CHANNELS))), scale, bias, shape3, **conv3)
    conv_node(
        "TernaryConv", "ternary_grouped", pack_bits(rng.integers(0, 2, (2, OUT, 3, 3, CHANNELS // 2))), scale, None,
        shape3, group=2, activation="Relu", **conv3,
    )  # fmt: skip
    gemm_scale = rng.uniform(0.5, 2, GEMM_OUT).astype(np.float32)
    gemm_bias = rng.standard_normal(GEMM_OUT).astype(np.float32)
    gemm_shape = [GEMM_ROWS, GEMM_OUT]
    conv_node(
        "BinaryGemm", EXACT_GEMM, pack_bits(rng.integers(0, 2, (GEMM_OUT, GEMM_DEPTH))), np.ones(GEMM_OUT, np.float32),
        None, gemm_shape, source="a", binarize_input="sign",
    )  # fmt: skip
    conv_node("BinaryGemm", "gemm_weight_only", pack_bits(rng.integers(0, 2, (GEMM_OUT, GEMM_DEPTH))), gemm_scale, gemm_bias, gemm_shape, source="a")
    conv_node("TernaryGemm", "ternary_gemm", pack_bits(rng.integers(0, 2, (2, GEMM_OUT, GEMM_DEPTH))), gemm_scale, gemm_bias, gemm_shape, source="a")
    graph = helper.make_graph(
        nodes,
        "binary_ops",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, [BATCH, CHANNELS, HEIGHT, WIDTH]),
            helper.make_tensor_value_info("a", TensorProto.FLOAT, [GEMM_ROWS, GEMM_DEPTH]),
        ],
        outputs,
        inits,
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(DOMAIN, 1)], ir_version=8)
    return ir.serde.deserialize_model(proto)


def initializer(graph: ir.Model, name: str) -> np.ndarray:
    return graph.graph.initializers[name].const_value.numpy()


def torch_integer_dot(x: np.ndarray, bits: np.ndarray, variant: Variant) -> np.ndarray:
    """Independent check: float64 PyTorch conv of b(x), zero padding, with the decoded unit weights."""
    import torch

    unit = unpack_bits(bits, CHANNELS).astype(np.float64)
    unit = 1 - 2 * unit if variant.encoding == "sign" else unit
    top, left, bottom, right = variant.pads
    data = torch.nn.functional.pad(torch.from_numpy(binarize(x, variant.binarize_input)), (left, right, top, bottom))
    weight = torch.from_numpy(np.ascontiguousarray(np.moveaxis(unit, 3, 1)))
    return torch.nn.functional.conv2d(data, weight, stride=variant.strides, dilation=variant.dilations).numpy()


def assert_close(got: np.ndarray, want: np.ndarray) -> None:
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=RTOL, atol=RTOL * max(float(np.abs(want).max()), 1.0))


@pytest.fixture(scope="module")
def graph() -> ir.Model:
    return build_graph()


@pytest.fixture(scope="module")
def feeds() -> tuple[np.ndarray, np.ndarray]:
    return _inputs(np.random.default_rng(1))


@pytest.fixture(scope="module")
def reference(graph, feeds) -> dict[str, np.ndarray]:
    outputs = run_numpy_reference(graph, list(feeds))
    return {value.name: array for value, array in zip(graph.graph.outputs, outputs, strict=True)}


@pytest.fixture(scope="module")
def x86(graph, tmp_path_factory):
    return edgec.compile(edgec.from_onnx_ir(build_graph()), "x86", tmp_path_factory.mktemp("binary_ops") / "x86")


# --------------------------------------------------------------------------
# the format and the NumPy references
# --------------------------------------------------------------------------


def test_bits_are_little_endian_along_the_channels():
    bits = np.zeros((2, 11), np.uint8)
    bits[0, 0] = bits[0, 9] = bits[1, 7] = 1
    packed = pack_bits(bits)
    assert packed.dtype == np.uint8 and packed.shape == (2, 2)
    assert packed.tolist() == [[0b1, 0b10], [0b10000000, 0]]
    np.testing.assert_array_equal(unpack_bits(packed, 11), bits)
    with pytest.raises(ValueError, match="cannot hold"):
        unpack_bits(packed, 17)


def test_kernel_words_are_the_bytes_read_little_endian():
    bits = np.random.default_rng(0).integers(0, 2, (3, 1, 1, 70))
    for word_bits in (32, 64):
        words = weight_words(pack_bits(bits), 70, "sign", word_bits)
        assert words.dtype == np.dtype(f"uint{word_bits}") and words.shape == (3, 1, 1, -(-70 // word_bits))
        for channel in (0, 5, 63, 64, 69):
            bit = (int(words[1, 0, 0, channel // word_bits]) >> (channel % word_bits)) & 1
            assert bit == bits[1, 0, 0, channel]
        # magnitude: the kernel holds the sign bits of u_sign = 2u - 1, the complement
        complement = weight_words(pack_bits(bits), 70, "magnitude", word_bits)
        assert (int(complement[2, 0, 0, 0]) & 1) == 1 - bits[2, 0, 0, 0]


def test_binarize_sign_keeps_zero_sign_ge0_does_not():
    x = np.array([-2.0, -0.0, 0.0, 3.0])
    np.testing.assert_array_equal(binarize(x, "sign"), [-1, 0, 0, 1])
    np.testing.assert_array_equal(binarize(x, "sign_ge0"), [-1, 1, 1, 1])
    np.testing.assert_array_equal(binarize(x, "none"), x)


@pytest.mark.parametrize("variant", EXACT, ids=lambda variant: variant.name)
def test_reference_is_the_integer_dot_with_zero_padding(graph, feeds, reference, variant):
    bits = initializer(graph, f"{variant.name}.bits")
    want = torch_integer_dot(feeds[0], bits, variant)
    np.testing.assert_array_equal(reference[variant.name], want.astype(np.float32))
    assert np.all(reference[variant.name] == np.round(reference[variant.name]))


def test_ternary_reference_decodes_both_planes(graph, feeds, reference):
    import torch

    bits = initializer(graph, "ternary.bits")
    unit = ternary_weights(bits, CHANNELS)  # (O, 3, 3, C)
    assert set(np.unique(unit)) <= {-1.0, 0.0, 1.0} and (unit == 0).any() and (unit == -1).any()
    weight = torch.from_numpy(np.ascontiguousarray(np.moveaxis(unit, 3, 1)))
    dot = torch.nn.functional.conv2d(torch.from_numpy(feeds[0].astype(np.float64)), weight, padding=1).numpy()
    want = dot.astype(np.float32) * initializer(graph, "ternary.scale").reshape(1, -1, 1, 1)
    want = want + initializer(graph, "ternary.bias").reshape(1, -1, 1, 1)
    assert_close(reference["ternary"], want)


# --------------------------------------------------------------------------
# x86: the compiled kernels
# --------------------------------------------------------------------------


def run_x86(result, feeds) -> dict[str, np.ndarray]:
    from edgec.runtimes.local import LocalRunner

    outputs = LocalRunner(result.artifact).run(list(feeds))
    return {value["name"]: array for value, array in zip(result.manifest["outputs"], outputs, strict=True)}


def test_x86_compiles_and_verifies_every_variant(x86):
    verification = x86.manifest["verification"]
    assert verification["status"] == "passed" and verification["numpy"]["enforced"]
    kernels = [call["kernel"] for call in x86.manifest["kernels"]]
    binary_layers = len(EXACT) + 2 + 1  # the exact convs, the two epilogues, the binary Gemm
    assert sum(kernel.startswith("edgec_binary_pack") for kernel in kernels) == binary_layers
    assert sum(kernel.startswith("edgec_xnor_conv") for kernel in kernels) == binary_layers
    # weight-only layers decode at run time: TVM's FoldConstant did not fold the weights back to float32
    assert sum(kernel.startswith("edgec_binary_decode") for kernel in kernels) == 3
    assert sum(kernel.startswith("edgec_ternary_decode") for kernel in kernels) == 3


@pytest.mark.parametrize("variant", EXACT, ids=lambda variant: variant.name)
def test_x86_xnor_popcount_is_bit_exact(x86, feeds, reference, variant):
    got = run_x86(x86, feeds)[variant.name]
    np.testing.assert_array_equal(got, reference[variant.name])


def test_x86_binary_gemm_is_bit_exact(x86, feeds, reference):
    got = run_x86(x86, feeds)[EXACT_GEMM]
    np.testing.assert_array_equal(got, reference[EXACT_GEMM])
    assert np.all(got == np.round(got))


@pytest.mark.parametrize("name", FLOAT_OUTPUTS)
def test_x86_float_outputs_match_reference(x86, feeds, reference, name):
    assert_close(run_x86(x86, feeds)[name], reference[name])


def test_x86_padding_is_exact_at_the_borders(x86, feeds, reference):
    """Padding with +1 (or -1) instead of 0 changes exactly the border outputs; the kernel does not."""
    variant = EXACT[0]
    got = run_x86(x86, feeds)[variant.name]
    bits = initializer(build_graph(), f"{variant.name}.bits")
    unit = np.moveaxis(1.0 - 2.0 * unpack_bits(bits, CHANNELS), 3, 1)
    plus_one = np.pad(np.sign(feeds[0].astype(np.float64)), ((0, 0), (0, 0), (1, 1), (1, 1)), constant_values=1.0)
    import torch

    wrong = torch.nn.functional.conv2d(torch.from_numpy(plus_one), torch.from_numpy(np.ascontiguousarray(unit))).numpy()
    border = np.ones(got.shape, bool)
    border[:, :, 1:-1, 1:-1] = False
    assert np.all(got[:, :, 1:-1, 1:-1] == wrong[:, :, 1:-1, 1:-1])  # interior: padding plays no part
    assert np.any(got[border] != wrong[border])  # the check is sensitive to the padding value
    np.testing.assert_array_equal(got, reference[variant.name])


def test_x86_uses_vector_popcount(x86):
    from tvm.target import codegen

    import tvm

    features = set(codegen.llvm_get_cpu_features(tvm.target.Target(x86.manifest["target"]["tvm"])))
    asm = _llvm_asm(build_graph(), "x86")
    if "avx512vpopcntdq" in features:
        assert "vpopcntq" in asm  # AVX-512 VPOPCNTDQ on 8 words at once
    else:
        assert "popcnt" in asm or "pshufb" in asm


@pytest.mark.parametrize(
    ("word_bits", "vector_bits", "mcpu", "instruction"),
    [(32, 128, None, None), (64, 128, None, None), (64, 256, "haswell", "vpshufb")],
    ids=["32-bit words", "64-bit words", "avx2"],
)
def test_kernels_are_bit_exact_for_other_word_and_vector_sizes(word_bits, vector_bits, mcpu, instruction):
    """armv7 runs 32-bit words, an AVX2 CPU counts bits with a vpshufb nibble table: the same
    kernels built that way, run on this machine."""
    import tvm

    from edgec.targets.host import host_cpu_name

    vector = CpuVector(lanes=vector_bits // 32, registers=16, word_bits=word_bits, popcount="test")
    shape = ConvShape(1, 40, 7, 6, (3, 3), (2, 1), (1, 1, 1, 1), (1, 1), out_channels=8)
    plan = xnor_plan(shape, vector)
    rng = np.random.default_rng(word_bits + vector_bits)
    x = rng.standard_normal((1, 40, 7, 6)).astype(np.float32)
    x[np.abs(x) < 0.3] = 0
    bits = pack_bits(rng.integers(0, 2, (8, 3, 3, 40)))
    target = tvm.target.Target({"kind": "llvm", "mcpu": mcpu or host_cpu_name()})
    pack = tvm.compile(tvm.IRModule({"main": pack_kernel(shape, plan, "sign", "sign")}), target=target)
    conv = tvm.compile(tvm.IRModule({"main": xnor_conv_kernel(shape, plan, "sign")}), target=target)
    if instruction is not None:
        assert instruction in conv.mod.inspect_source("s")
    planes = tvm.runtime.empty((1, *plan.plane_shape), plan.dtype)
    base = tvm.runtime.empty((1, shape.out_height, plan.padded_width), "int32")
    pack(tvm.runtime.tensor(x), planes, base)
    y = tvm.runtime.empty((1, 8, shape.out_height, shape.out_width), "float32")
    words = weight_words(bits, 40, "sign", word_bits)
    ones, zeros = (tvm.runtime.tensor(np.full(8, value, np.float32)) for value in (1.0, 0.0))
    conv(planes, base, tvm.runtime.tensor(words), ones, zeros, y)
    want = _torch_dot_any(x, bits, 40, Variant("w", "sign", "sign", strides=(2, 1)))
    np.testing.assert_array_equal(y.numpy(), want.astype(np.float32))


def test_bit_kernel_words_and_tiles_follow_the_target():
    from tvm.target import codegen

    import tvm

    from edgec.targets import resolve

    armv7, aarch64, x86 = (cpu_vector(resolve(name)) for name in ("cortex-a7", "cortex-a53", "x86"))
    assert (armv7.word_bits, armv7.lanes_of(armv7.word_dtype), armv7.registers) == (32, 4, 16)
    assert (aarch64.word_bits, aarch64.lanes_of(aarch64.word_dtype), aarch64.registers) == (64, 2, 32)
    features = set(codegen.llvm_get_cpu_features(tvm.target.Target(resolve("x86").tvm_json)))
    integer_bits = 512 if "avx512f" in features else 256 if "avx2" in features else 128
    assert x86.word_bits == 64 and x86.lanes_of("uint64") * 64 == integer_bits
    assert ("vpopcntq" in x86.popcount) == ("avx512vpopcntdq" in features and "avx512f" in features)
    shape = ConvShape(1, 64, 56, 56, (3, 3), (1, 1), (1, 1, 1, 1), out_channels=64)
    plan = xnor_plan(shape, x86)
    assert plan.out_tile * plan.lanes * 8 < 1024  # the register tile stays a stack buffer
    # the popcount loop keeps 6 registers for its operands: 10 accumulators of 16 registers (armv7), not 12
    assert xnor_plan(dataclasses.replace(shape, out_channels=60), armv7).out_tile == 10
    assert xnor_plan(dataclasses.replace(shape, out_channels=60), aarch64).out_tile == 15  # at most 16


def _torch_dot_any(x, bits, channels, variant) -> np.ndarray:
    import torch

    unit = np.moveaxis(1.0 - 2.0 * unpack_bits(bits, channels), 3, 1)
    data = torch.nn.functional.pad(torch.from_numpy(np.sign(x.astype(np.float64))), (1, 1, 1, 1))
    return torch.nn.functional.conv2d(data, torch.from_numpy(np.ascontiguousarray(unit)), stride=variant.strides).numpy()


def test_cuda_lowers_to_dense_ops_without_cpu_kernels(graph):
    from edgec.lower import to_relax
    from edgec.targets import resolve

    mod = to_relax(graph, resolve("cuda"))
    names = [gvar.name_hint for gvar in mod.get_global_vars()]
    assert not any(name.startswith("edgec_") for name in names)
    assert "R.nn.conv2d" in mod["main"].script()


# --------------------------------------------------------------------------
# ARM: cross-compiled, and run under qemu
# --------------------------------------------------------------------------

ARM = {"cortex-a7": ("ARM", "vcnt.8"), "cortex-a53": ("AArch64", "cnt\tv")}


def _llvm_asm(graph: ir.Model, preset: str) -> str:
    from edgec.build import build
    from edgec.lower import to_relax
    from edgec.targets import resolve

    target = resolve(preset)
    executable = build(to_relax(graph, target), target).executable
    modules = [module for module in executable.mod.imports if module.kind == "llvm"]
    return "\n".join(module.inspect_source("s") for module in modules)


def _require_cross(preset: str) -> None:
    from edgec.targets.presets import PRESETS

    chain = PRESETS[preset].toolchain
    if shutil.which(chain.compiler) is None:
        pytest.skip(f"{chain.compiler} missing (apt-get install {chain.debian_package})")


@pytest.fixture(scope="module")
def arm_artifacts(tmp_path_factory):
    root = tmp_path_factory.mktemp("binary_arm")
    built: dict[str, object] = {}

    def get(preset: str):
        _require_cross(preset)
        if preset not in built:
            built[preset] = edgec.compile(edgec.from_onnx_ir(build_graph()), preset, root / preset)
        return built[preset]

    return get


@pytest.mark.parametrize("preset", ARM)
def test_arm_cross_compiles_with_neon_popcount(arm_artifacts, preset):
    from edgec.targets.presets import PRESETS

    result = arm_artifacts(preset)
    machine, instruction = ARM[preset]
    header = (result.artifact.path / "lib.so").read_bytes()[:20]
    assert header[:4] == b"\x7fELF"
    elf_machine = int.from_bytes(header[18:20], "little")
    assert elf_machine == {"ARM": 40, "AArch64": 183}[machine] == {"armv7": 40, "aarch64": 183}[PRESETS[preset].cpu_arch]
    kernels = [call["kernel"] for call in result.manifest["kernels"]]
    assert any(kernel.startswith("edgec_xnor_conv") for kernel in kernels)
    assert instruction in _llvm_asm(build_graph(), preset)  # NEON population count


@pytest.mark.slow
@pytest.mark.parametrize("preset", ARM)
def test_arm_runs_bit_exact_under_qemu(arm_artifacts, feeds, reference, preset):
    """The cross-compiled lib.so on an emulated board (edgec-agent under qemu-user, over RPC)."""
    import tvm
    from tvm import relax, rpc

    from edgec.runtimes.emulate import EMULATORS, emulate
    from edgec.targets.presets import PRESETS

    qemu = EMULATORS[PRESETS[preset].cpu_arch].qemu
    if shutil.which(qemu) is None:
        pytest.skip(f"{qemu} missing (apt-get install qemu-user-static)")
    result = arm_artifacts(preset)
    with emulate(preset, timeout=120) as agent:
        remote = rpc.connect(agent.host, agent.port, session_timeout=300)
        remote.upload(str(result.artifact.path / "lib.so"))
        device = remote.cpu()
        vm = relax.VirtualMachine(remote.load_module("lib.so"), device)
        vm.set_input("main", *(tvm.runtime.tensor(array, device) for array in feeds))
        vm.invoke_stateful("main")
        outputs = vm.get_outputs("main")
        got = {value["name"]: outputs[index].numpy() for index, value in enumerate(result.manifest["outputs"])}
        info = json.loads(remote.get_function("edgec.device.info")())
        assert info["cpu_arch"] == PRESETS[preset].cpu_arch and info["emulated"] is True
        del vm, outputs, remote
    for variant in EXACT:
        np.testing.assert_array_equal(got[variant.name], reference[variant.name])
    np.testing.assert_array_equal(got[EXACT_GEMM], reference[EXACT_GEMM])
    for name in FLOAT_OUTPUTS:
        assert_close(got[name], reference[name])
