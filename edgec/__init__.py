"""edgec: a deployment compiler for compressed CNNs.

    import edgec
    from edgec.passes import FoldBatchNormPass
    model = edgec.load("model.pt", input_shape=(1, 3, 224, 224))
    edgec.apply(model, [FoldBatchNormPass()])
    edgec.compile(model, target="cortex-a7", output="build/model")

Heavy modules (torch, tvm, onnx) load on first use, so ``edgec --help`` is instant.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from edgec.core.errors import EdgecError

__version__ = "0.1.0"

_LAZY = {
    "load": ("edgec.frontend", "load"),
    "from_onnx_ir": ("edgec.frontend", "from_onnx_ir"),
    "compile": ("edgec.compiler", "compile"),
    "VerifyOptions": ("edgec.compiler", "VerifyOptions"),
    "apply": ("edgec.apply_passes", "apply"),
    "Model": ("edgec.core.model", "Model"),
    "load_artifact": ("edgec.core.artifact", "load_artifact"),
}

if TYPE_CHECKING:
    from edgec.apply_passes import apply
    from edgec.core.artifact import load_artifact
    from edgec.compiler import VerifyOptions, compile
    from edgec.frontend import from_onnx_ir, load
    from edgec.core.model import Model


def __getattr__(name: str):
    if name in _LAZY:
        module, attribute = _LAZY[name]
        return getattr(importlib.import_module(module), attribute)
    raise AttributeError(f"module 'edgec' has no attribute {name!r}")


__all__ = ["EdgecError", "Model", "VerifyOptions", "__version__", "apply", "compile", "from_onnx_ir", "load", "load_artifact"]
