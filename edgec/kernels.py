"""The kernel table: which compiled TIR kernels ``main`` calls, in order.

Captured inside the Relax pipeline right after operator fusion, from the same
IRModule that is built, so the kernel names are the symbols in ``lib.so``.
Each call records its argument and output shapes, the kernel's FLOPs, and
the ONNX nodes it most likely came from. That last mapping is best effort:
TVM's ONNX importer keeps no node names, so kernels are aligned with the ONNX
nodes in graph order by the operator names FuseOps composes into kernel
names (``fused_conv2d3_add2_maximum1_minimum1`` -> Conv, Clip).

The profiler (runtimes/profile.py) times each kernel on the device with
these shapes; the manifest stores the table so no TVM IR is needed there.
Integer constants a kernel reads (the block-sparse formats' indices) decide
how much work it does, so random or zero stand-ins would time a different
kernel: their values go to ``kernel_constants.npz`` beside ``lib.so``, and
the argument names its key (``"constant": "c3"``).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import onnx_ir as ir

# ONNX op -> the Relax/TIR operator names it legalizes to (first one is the anchor)
_ONNX_TOKENS: dict[str, tuple[str, ...]] = {
    "Conv": ("conv2d", "conv1d", "conv3d", "add"),
    "ConvTranspose": ("conv2d_transpose", "conv1d_transpose", "add"),
    "Gemm": ("matmul", "dense", "permute_dims", "add", "multiply"),
    "MatMul": ("matmul",),
    "Relu": ("relu",),
    "Clip": ("clip", "maximum", "minimum"),
    "Sigmoid": ("sigmoid",),
    "HardSigmoid": ("hard_sigmoid", "divide", "add", "clip", "maximum", "minimum", "multiply"),
    "HardSwish": ("hard_swish", "multiply", "divide", "add", "clip", "maximum", "minimum"),
    "Add": ("add",),
    "Mul": ("multiply",),
    "Sub": ("subtract",),
    "Div": ("divide",),
    "BatchNormalization": ("batch_norm", "subtract", "divide", "sqrt", "add", "multiply"),
    "GlobalAveragePool": ("mean", "adaptive_avg_pool2d", "sum", "divide"),
    "AveragePool": ("avg_pool2d",),
    "MaxPool": ("max_pool2d",),
    "Concat": ("concatenate",),
    "Softmax": ("softmax",),
    "Reshape": ("reshape",),
    "Flatten": ("reshape",),
    "Transpose": ("transpose", "permute_dims"),
}


def _tokens(kernel: str) -> list[str]:
    parts = kernel.split("_")
    tokens = []
    index = 1 if parts and parts[0] == "fused" else 0
    # operator names contain underscores (max_pool2d): greedily join parts that form a known name
    known = {token for values in _ONNX_TOKENS.values() for token in values}
    while index < len(parts):
        for width in (3, 2, 1):
            candidate = re.sub(r"\d+$", "", "_".join(parts[index : index + width]))
            if width == 1 or candidate in known:
                tokens.append(candidate)
                index += width
                break
    return tokens


def _struct(sinfo) -> dict[str, Any]:
    shape = [int(dim) for dim in sinfo.shape] if getattr(sinfo, "shape", None) is not None else None
    return {"shape": shape, "dtype": str(sinfo.dtype)}


def kernel_calls(mod, constants: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """The ``call_tir`` calls of ``main`` in execution order, with shapes and FLOPs.

    ``constants`` (optional) receives the integer constant arguments by key.
    """
    import tvm
    from tvm import relax, tirx
    from tvm.s_tir.analysis import estimate_tir_flops

    main = mod["main"]
    flops_cache: dict[str, float] = {}
    calls = []
    call_tir = tvm.ir.Op.get("relax.call_tir")
    for block in main.body.blocks:
        for binding in block.bindings:
            value = binding.value
            if not isinstance(value, relax.Call) or value.op != call_tir:
                continue
            kernel = value.args[0].name_hint
            prim = mod[value.args[0]]
            declared = prim.attrs.get("edgec.flops") if isinstance(prim, tirx.PrimFunc) and prim.attrs else None
            if declared is not None:  # custom-op kernels whose loop bounds are data (estimate_tir_flops cannot)
                flops_cache[kernel] = float(declared)
            if kernel not in flops_cache and isinstance(prim, tirx.PrimFunc):
                try:
                    flops_cache[kernel] = float(estimate_tir_flops(tvm_module_of(prim)))
                except Exception:  # noqa: BLE001 - FLOP estimation is informative only
                    flops_cache[kernel] = 0.0
            arguments = [_argument(arg, constants) for arg in value.args[1].fields]
            outputs = value.ty
            outs = [_struct(item) for item in outputs.fields] if hasattr(outputs, "fields") else [_struct(outputs)]
            calls.append({"kernel": kernel, "args": arguments, "outputs": outs, "flops": flops_cache.get(kernel, 0.0)})
    return calls


def _argument(arg, constants: dict[str, Any] | None) -> dict[str, Any]:
    import tvm

    spec = _struct(arg.ty)
    if constants is not None and isinstance(arg, tvm.ir.expr.Constant) and spec["dtype"].startswith(("int", "uint")):
        key = f"c{len(constants)}"
        constants[key] = arg.value.numpy()
        spec["constant"] = key
    return spec


def tvm_module_of(prim):
    import tvm

    return tvm.IRModule({"main": prim})


# ops a kernel computes only when it names their anchor operator: an epilogue's other tokens (an
# int8 requantization writes add, cast, multiply, maximum, minimum, add, cast) are not the next Conv
_ANCHORED = frozenset({"Conv", "ConvTranspose", "Gemm", "MatMul", "AveragePool", "MaxPool", "Concat", "Softmax"})


def attach_onnx_nodes(calls: list[dict[str, Any]], graph: ir.Model) -> None:
    """Best-effort: give each kernel call the ONNX nodes (in order) it most likely computes."""
    nodes = [node for node in graph.graph if node.op_type in _ONNX_TOKENS]
    position = 0
    for call in calls:
        remaining = _tokens(call["kernel"])
        assigned = []
        while position < len(nodes) and remaining:
            node = nodes[position]
            anchors = _node_tokens(node)
            loose = node.op_type not in _ANCHORED and any(token in remaining for token in anchors)
            if anchors[0] in remaining or loose:
                for token in anchors:
                    if token in remaining:
                        remaining.remove(token)
                assigned.append(node.name or node.op_type)
                position += 1
            elif node.op_type in ("Reshape", "Flatten", "Transpose"):
                position += 1  # often lowered to a VM builtin, not a kernel
            else:
                break
        call["onnx_nodes"] = assigned


def _node_tokens(node) -> tuple[str, ...]:
    """The operator names ``node`` legalizes to: ``_ONNX_TOKENS``, less a convolution's ``add``
    when it has no bias (the ``add`` after it is then the next node's: a batch norm whose scale
    the graph stage folded into the weights, targets/schedules/fold_scale.py, leaves only its add)."""
    tokens = _ONNX_TOKENS[node.op_type]
    if node.op_type in ("Conv", "ConvTranspose") and not (len(node.inputs) > 2 and node.inputs[2] is not None):
        return tuple(token for token in tokens if token != "add")
    return tokens


def capture_pass(keep: Callable[[Any], None]):
    """A module pass that hands the IRModule it sees to ``keep`` and passes it on unchanged."""
    import tvm

    @tvm.transform.module_pass(opt_level=0, name="EdgecCaptureKernels")
    def _capture(mod, _ctx):
        keep(mod)
        return mod

    return _capture
