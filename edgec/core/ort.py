"""Opening an ONNX Runtime session on an onnx_ir graph: written once, for every layer that runs ORT.

ONNX Runtime is a library, not an edgec runtime: the verification oracle
(runtimes/reference.py) and int8 calibration (passes/quantize_int8.py, which
runs the float graph on the user's calibration data to measure activation
ranges) both open their sessions here. Graphs over protobuf's 2 GiB reach ORT through a
temporary file with external data (edgec/core/onnx_files.py).
"""

from __future__ import annotations

import onnx_ir as ir

from edgec.core.onnx_files import saved_copy, serialized

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
    model = serialized(graph, ORT_MAX_IR_VERSION)
    if model is not None:
        return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
    with saved_copy(graph, ORT_MAX_IR_VERSION) as path:  # over protobuf's 2 GiB: ORT reads the weights from a file
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
