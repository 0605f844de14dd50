"""edgec/torchscript_symbolics.py: a traced nn.MultiheadAttention (its eval-mode fast path,
``aten::_native_multi_head_attention``) loads, matches PyTorch and compiles.

Found by the torchvision corpus (bench/torchvision_corpus.py): every ViT traced under
``torch.no_grad()`` failed to load ("Exporting the operator
'aten::_native_multi_head_attention' to ONNX opset version 17 is not supported")."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest

import edgec

SHAPE = (1, 5, 16)  # batch, tokens, embedding
RTOL = ATOL = 1e-4


def encoder_block(heads: int):
    """Self-attention + residual + LayerNorm, as a ViT's encoder block uses it."""
    import torch

    class Block(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.attention = torch.nn.MultiheadAttention(SHAPE[-1], heads, batch_first=True)
            self.norm = torch.nn.LayerNorm(SHAPE[-1])

        def forward(self, x):
            attended, _ = self.attention(x, x, x, need_weights=False)
            return self.norm(attended + x)

    torch.manual_seed(heads)
    return Block().eval()


def traced(tmp_path, heads: int):
    """The block traced under no_grad (PyTorch then takes the fast path) and saved; (path, module)."""
    import torch

    module = encoder_block(heads)
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        script = torch.jit.trace(module, (x,), check_trace=False)
    assert any(node.kind() == "aten::_native_multi_head_attention" for node in script.inlined_graph.nodes())
    path = tmp_path / f"block{heads}.pt"
    script.save(str(path))
    return path, module


@pytest.mark.parametrize("heads", [2, 4])  # PyTorch takes the fast path for an even number of heads only
def test_traced_fast_path_attention_loads_and_matches_pytorch(tmp_path, heads):
    import onnxruntime as ort
    import torch

    path, module = traced(tmp_path, heads)
    model = edgec.load(path, input_shape=SHAPE)
    ops = {node.op_type for node in model.graph.graph}
    assert {"MatMul", "Softmax"} <= ops and not any(node.domain.startswith("aten") for node in model.graph.graph)
    x = np.random.default_rng(1).standard_normal(SHAPE).astype(np.float32)
    session = ort.InferenceSession(ir.serde.serialize_model(model.graph).SerializeToString(), providers=["CPUExecutionProvider"])
    got = session.run(None, {session.get_inputs()[0].name: x})[0]
    with torch.no_grad():
        want = module(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL)


def test_traced_fast_path_attention_compiles_and_verifies(tmp_path):
    path, _ = traced(tmp_path, 4)
    result = edgec.compile(edgec.load(path, input_shape=SHAPE), "x86", tmp_path / "out")
    verification = result.manifest["verification"]
    assert verification["status"] == "passed"
    assert verification["pytorch"]["max_abs"] <= ATOL
