"""ONNX symbolics edgec adds to torch's TorchScript exporter, for ops it cannot export.

``aten::_native_multi_head_attention``: ``nn.MultiheadAttention``'s fast path, which
PyTorch takes in eval mode without autograd (``torch.no_grad()``, the usual way to
trace a model for deployment) for batch-first 3-D inputs. A traced transformer
(torchvision's ViTs) keeps that op, and the exporter has no symbolic for it:
"Exporting the operator 'aten::_native_multi_head_attention' to ONNX opset version
17 is not supported". The symbolic writes the op's math in standard ONNX ops, for
query (B, Lq, E), key and value (B, Lk, E), H heads of D = E / H:

    q, k, v = query Wq^T + bq, key Wk^T + bk, value Wv^T + bv    (W = [Wq; Wk; Wv], b likewise)
    per head h:  o_h = softmax(q_h k_h^T / sqrt(D)) v_h          (q_h: B x Lq x D, columns hD..hD+D-1)
    out = [o_1 ... o_H] Wo^T + bo

Its second output (the attention weights) is only computed when ``need_weights``;
the fast path is taken only without them, so a mask or ``need_weights=True`` is
refused with the exporter's "unsupported" error.
"""

from __future__ import annotations

import math

# the opset the symbolics are registered for and above (edgec exports at ONNX_OPSET, 17)
SINCE_OPSET = 13
NATIVE_MHA = "aten::_native_multi_head_attention"


def register() -> None:
    """Make torch's TorchScript exporter use edgec's symbolics (idempotent)."""
    import torch

    torch.onnx.register_custom_op_symbolic(NATIVE_MHA, native_multi_head_attention, SINCE_OPSET)


def native_multi_head_attention(g, query, key, value, embed_dim, num_head, qkv_weight, qkv_bias, proj_weight, proj_bias,
                                mask=None, need_weights=None, average_attn_weights=None, mask_type=None):
    """``aten::_native_multi_head_attention`` as MatMul / Softmax; see the module docstring."""
    import torch
    from torch.onnx import symbolic_helper

    embed = symbolic_helper._get_const(embed_dim, "i", "embed_dim")
    heads = symbolic_helper._get_const(num_head, "i", "num_head")
    if not symbolic_helper._is_none(mask):
        return symbolic_helper._unimplemented(NATIVE_MHA, "an attention mask", mask)
    if symbolic_helper._maybe_get_const(need_weights, "b") is True:
        return symbolic_helper._unimplemented(NATIVE_MHA, "need_weights=True", need_weights)
    if embed % heads:
        return symbolic_helper._unimplemented(NATIVE_MHA, f"embed_dim {embed} not a multiple of num_head {heads}", query)
    head_dim = embed // heads

    def const(values, dtype=torch.int64):
        return g.op("Constant", value_t=torch.tensor(values, dtype=dtype))

    def linear(x, weight, bias):  # x W^T + b
        return g.op("Add", g.op("MatMul", x, g.op("Transpose", weight, perm_i=[1, 0])), bias)

    def split_heads(x):  # B x L x E -> B x H x L x D
        return g.op("Transpose", g.op("Reshape", x, const([0, -1, heads, head_dim])), perm_i=[0, 2, 1, 3])

    def rows(tensor, index):  # rows index*E .. (index+1)*E - 1 (Slice: folded with the weights)
        return g.op("Slice", tensor, const([index * embed]), const([(index + 1) * embed]), const([0]))

    q, k, v = (split_heads(linear(x, rows(qkv_weight, index), rows(qkv_bias, index)))
               for index, x in enumerate((query, key, value)))
    scores = g.op("Mul", g.op("MatMul", q, g.op("Transpose", k, perm_i=[0, 1, 3, 2])),
                  const(1.0 / math.sqrt(head_dim), torch.float32))
    attended = g.op("MatMul", g.op("Softmax", scores, axis_i=-1), v)  # B x H x Lq x D
    merged = g.op("Reshape", g.op("Transpose", attended, perm_i=[0, 2, 1, 3]), const([0, -1, embed]))
    no_weights = g.op("Constant", value_t=torch.zeros(0, dtype=torch.float32))  # what the op returns without need_weights
    return linear(merged, proj_weight, proj_bias), no_weights
