"""Matrix products padded to whole register tiles (targets/schedules/pad_matmul.py, graph.py step
6c): which row counts are padded and to what, the rewrite of a Relax module (a constant and an
activation operand), its outputs against NumPy, a rewrite that fails leaving the product as it
was (recorded), and a small attention block with ViT-B/16's 197 tokens compiled for x86: the
products run on padded operands under the ``dense`` rule, sliced back, outputs equal to ONNX
Runtime's.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from backbone import traced_model  # tests/ is on the path
from torch import nn

import edgec
from edgec.core.fallbacks import FallbackLog
from edgec.runtimes.local import LocalRunner
from edgec.runtimes.reference import run_onnxruntime
from edgec.targets.schedules import pad_matmul
from edgec.targets.schedules.pad_matmul import padded_rows

tvm = pytest.importorskip("tvm")
from tvm import relax  # noqa: E402

TOKENS = 197  # ViT-B/16: 14 x 14 patches and the class token, a prime


def test_rows_without_a_tile_of_four_to_eight_are_padded_within_an_eighth():
    assert padded_rows(TOKENS) == 200
    assert padded_rows(101) == 104
    assert padded_rows(131) == 136
    for whole in (196, 49, 50, 200, 3136, 1000):  # a tile of 4-8 rows divides them
        assert padded_rows(whole) is None
    assert padded_rows(13) is None  # under MIN_ROWS: a matrix-vector product's business
    assert padded_rows(17) is None  # 20 or 24 rows would add more than an eighth


def _module(a_shape, b_value=None, b_shape=None):
    """main(a[, b]) = matmul(a, b): ``b`` a constant when ``b_value`` is given."""
    builder = relax.BlockBuilder()
    a = relax.Var("a", relax.TensorType(a_shape, "float32"))
    params = [a]
    if b_value is None:
        b = relax.Var("b", relax.TensorType(b_shape, "float32"))
        params.append(b)
    else:
        b = relax.const(b_value, "float32")
    with builder.function("main", params):
        with builder.dataflow():
            out = builder.emit_output(builder.emit(relax.op.matmul(a, b)))
        builder.emit_func_output(out)
    return builder.get()


def _ops(mod) -> list[str]:
    names = []

    def visit(expr):
        if isinstance(expr, relax.Call) and hasattr(expr.op, "name"):
            names.append(expr.op.name)

    relax.analysis.post_order_visit(mod["main"], visit)
    return names


def _run(mod, *arrays):
    executable = relax.build(mod, target="llvm")
    vm = relax.VirtualMachine(executable, tvm.cpu())
    return vm["main"](*[tvm.runtime.tensor(array) for array in arrays]).numpy()


def test_weights_and_activations_are_padded_and_the_product_sliced_back():
    rng = np.random.default_rng(0)
    weight = rng.standard_normal((32, 60)).astype("float32")
    x = rng.standard_normal((1, TOKENS, 32)).astype("float32")
    keys = rng.standard_normal((2, 16, TOKENS)).astype("float32")
    queries = rng.standard_normal((2, TOKENS, 16)).astype("float32")
    for mod, args, want in (
        (_module([1, TOKENS, 32], b_value=weight), [x], x @ weight),  # rows 197 -> 200; 60 columns -> 64
        (_module([2, TOKENS, 16], b_shape=[2, 16, TOKENS]), [queries, keys], queries @ keys),  # q k^T: both 197 -> 200, 208
    ):
        padded = pad_matmul.pad_matmul(16)(mod)
        ops = _ops(padded)
        assert ops.count("relax.matmul") == 1 and ops[-1] == "relax.strided_slice", ops
        product = next(binding.value for binding in padded["main"].body.blocks[0].bindings
                       if isinstance(binding.value, relax.Call) and binding.value.op.name == "relax.matmul")  # fmt: skip
        a_rows = int(product.args[0].ty.shape[-2])
        b_columns = int(product.args[1].ty.shape[-1])
        assert a_rows == 200 and b_columns in (64, 208)
        np.testing.assert_allclose(_run(padded, *args), want, rtol=1e-5, atol=1e-4)


def test_whole_tiles_are_left_alone():
    mod = _module([1, 196, 32], b_value=np.ones((32, 64), "float32"))
    tvm.ir.assert_structural_equal(pad_matmul.pad_matmul(16)(mod), mod)


def test_a_failing_rewrite_keeps_the_product_and_records_it(monkeypatch):
    def broken(*_args):
        raise RuntimeError("forced")

    monkeypatch.setattr(pad_matmul, "_padded", broken)
    fallbacks = FallbackLog()
    mod = _module([1, TOKENS, 32], b_value=np.ones((32, 48), "float32"))
    after = pad_matmul.pad_matmul(16, fallbacks)(mod)
    assert _ops(after) == ["relax.matmul"]
    assert [(entry["rule"], "forced" in entry["reason"]) for entry in fallbacks.as_list()] == [(pad_matmul.RULE, True)]


class Attention(nn.Module):
    """One head of self-attention over 197 tokens of 32 channels, and an MLP."""

    def __init__(self):
        super().__init__()
        self.qkv = nn.Linear(32, 96)
        self.mlp = nn.Linear(32, 64)

    def forward(self, x):
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        attention = torch.softmax(q @ k.transpose(-2, -1) * 32**-0.5, dim=-1)
        return self.mlp(attention @ v)


def test_attention_with_197_tokens_runs_padded_and_matches_onnxruntime(tmp_path):
    model = traced_model(Attention(), (1, TOKENS, 32), tmp_path / "attention.pt")
    result = edgec.compile(model, "x86", tmp_path / "x86")
    manifest = result.manifest
    assert manifest["verification"]["status"] == "passed"
    products = [call for call in manifest["kernels"] if "matmul" in call["kernel"]]
    assert products and all(call["schedule"] == "dense" for call in products)
    assert all("strided_slice" in call["kernel"] for call in products)  # every one padded (rows) and sliced back
    assert all(arg["shape"][-2] == 200 for call in products for arg in call["args"][:1])
    assert manifest["schedules"]["fallbacks"] == []
    x = np.random.default_rng(3).standard_normal((1, TOKENS, 32)).astype("float32")
    got = LocalRunner(result.artifact).run([x])[0]
    np.testing.assert_allclose(got, run_onnxruntime(model.graph, [x])[0], rtol=1e-4, atol=1e-4)


def _region(shape, packed=False):
    from types import SimpleNamespace

    from tvm import tirx

    n = tirx.Var("n", "int32")
    last = tirx.FloorMod(n, 16) if packed else n
    return SimpleNamespace(source=SimpleNamespace(shape=shape, dtype=SimpleNamespace(bits=32)),
                           region=[SimpleNamespace(min=n)] * (len(shape) - 1) + [SimpleNamespace(min=last)])  # fmt: skip


def test_products_stream_their_weights_once_when_a_matrix_outgrows_the_cache():
    from edgec.targets.schedules.dense import streams_weights

    assert streams_weights(_region([1, 200, 768]), _region([768, 3072]))  # ViT-B MLP: 9.4 MB of weights
    assert streams_weights(_region([1, 200, 768]), _region([768, 768]))  # its projections: 2.4 MB
    assert not streams_weights(_region([16, 49, 256]), _region([16, 256, 256]))  # a Winograd GEMM: 256 KB per matrix
    assert not streams_weights(_region([1, 4096, 768]), _region([768, 768]))  # more rows than weights
    assert streams_weights(_region([1, 200, 768]), _region([48, 768, 16], packed=True))  # packed by 16 columns
