"""Opening an ONNX Runtime session on an onnx_ir graph: written once, for every layer that runs ORT.

ONNX Runtime is a library, not an edgec runtime: the verification oracle
(runtimes/reference.py) and int8 calibration (passes/quantize_int8.py, which
runs the float graph on the user's calibration data to measure activation
ranges) both open their sessions here.
"""

from __future__ import annotations

import onnx_ir as ir

# The newest ONNX IR version the pinned onnxruntime (1.31) reads; onnx 1.23 writes
# IR 14 by default although no edgec graph uses anything newer than IR 13 features.
ORT_MAX_IR_VERSION = 13


def onnxruntime_session(graph: ir.Model, threads: int | None = None, *, optimize: bool = True):
    """An ORT CPU session on ``graph``; ``optimize``: all graph optimisations on (ORT's default
    for deployment), else none (every node runs as written: e.g. a QDQ graph in float)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = (
        ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize else ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    )
    options.log_severity_level = 3
    if threads:
        options.intra_op_num_threads = threads
    proto = ir.serde.serialize_model(graph)
    proto.ir_version = min(proto.ir_version, ORT_MAX_IR_VERSION)
    return ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])
