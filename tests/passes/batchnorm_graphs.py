"""Graph builders and checks shared by the fold-bn tests (test_fold_batchnorm*.py):
ONNX models made by hand, ONNX Runtime with graph optimisations off, seeded feeds."""

from __future__ import annotations

import collections
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
from onnx import TensorProto, helper, numpy_helper


LOGGER = "edgec.passes.fold_batchnorm"
RTOL = 1e-5
EPSILON = 1e-3
LIGHT = Path(onnx.__file__).parent / "backend" / "test" / "data" / "light"




def make_model(nodes, inputs, outputs, initializers, *, opset=17, ir_version=8, graph_inputs_extra=()):
    """An onnx_ir model from onnx.helper pieces: ``inputs``/``outputs`` map names to shapes (or None)."""
    graph = helper.make_graph(
        nodes,
        "fold_bn_test",
        [helper.make_tensor_value_info(name, TensorProto.FLOAT, shape) for name, shape in inputs.items()]
        + list(graph_inputs_extra),
        [helper.make_tensor_value_info(name, TensorProto.FLOAT, shape) for name, shape in outputs.items()],
        [numpy_helper.from_array(np.asarray(array), name) for name, array in initializers.items()],
    )
    # onnx 1.23's default IR version (14) is newer than ONNX Runtime 1.31 reads (13)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=ir_version)
    proto = onnx.shape_inference.infer_shapes(proto, strict_mode=True)  # fills the output shapes left as None
    return ir.serde.deserialize_model(proto)


def bn_params(rng, channels: int, prefix: str = "bn") -> dict[str, np.ndarray]:
    gamma = rng.uniform(0.5, 1.5, channels) * rng.choice([-1.0, 1.0], channels)
    return {
        f"{prefix}.scale": gamma.astype(np.float32),
        f"{prefix}.bias": rng.uniform(-1, 1, channels).astype(np.float32),
        f"{prefix}.mean": rng.uniform(-2, 2, channels).astype(np.float32),
        f"{prefix}.var": rng.uniform(0.2, 3.0, channels).astype(np.float32),
    }


def bn_node(data: str, output: str, prefix: str = "bn", name: str = "bn", **attributes):
    names = [f"{prefix}.{part}" for part in ("scale", "bias", "mean", "var")]
    return helper.make_node(
        "BatchNormalization", [data, *names], [output], name=name, epsilon=attributes.pop("epsilon", EPSILON), **attributes
    )


def randn(rng, *shape) -> np.ndarray:
    return rng.standard_normal(shape).astype(np.float32)


def session(model: ir.Model):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # BN runs as BN
    options.log_severity_level = 3
    proto = ir.serde.serialize_model(model)
    return ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])


def run(model: ir.Model, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    return session(model).run(None, feeds)


def seeded_feeds(model: ir.Model, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        value.name: rng.standard_normal(tuple(int(dim) for dim in value.shape)).astype(np.float32)
        for value in model.graph.inputs
        if not value.is_initializer()
    }


def assert_close(after: list[np.ndarray], before: list[np.ndarray]) -> None:
    assert len(after) == len(before)
    for got, want in zip(after, before, strict=True):
        assert got.shape == want.shape
        scale = float(np.max(np.abs(want))) if want.size else 1.0
        np.testing.assert_allclose(got, want, rtol=RTOL, atol=RTOL * scale)


def well_formed(model: ir.Model) -> None:
    onnx.checker.check_model(ir.serde.serialize_model(model), full_check=True)


def ops(model: ir.Model) -> collections.Counter:
    return collections.Counter(node.op_type for node in model.graph)


def signature(model: ir.Model) -> tuple:
    return (
        [(value.name, str(value.shape), value.dtype) for value in model.graph.inputs],
        [(value.name, str(value.shape), value.dtype) for value in model.graph.outputs],
    )


def serialized(model: ir.Model) -> bytes:
    return ir.serde.serialize_model(model).SerializeToString()


def skip_messages(caplog) -> list[str]:
    return [record.getMessage() for record in caplog.records if record.name == LOGGER and "not folded" in record.getMessage()]


# --------------------------------------------------------------------------
# the math (pure NumPy)
# --------------------------------------------------------------------------
