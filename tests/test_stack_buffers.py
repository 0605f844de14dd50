"""edgec/stack_buffers.py: kernels' scratch buffers of 1-16 KiB on the stack, not in TVM's
workspace pool: which buffers the pass marks, that TVM then emits no workspace call for
them, and that builds with and without it compute the same outputs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import edgec
from backbone import ATOL, RTOL, require_host_features
from edgec.build import BuildOptions, build
from edgec.core.artifact import load_artifact
from edgec.runtimes.local import LocalRunner
from edgec.stack_buffers import ANNOTATION, StackPolicy, stack_buffers, tir_pipeline

tvm = pytest.importorskip("tvm")
from tvm.script import tirx as T  # noqa: E402

WORKSPACE = "TVMBackendAllocWorkspace"
X86 = {"kind": "llvm", "mtriple": "x86_64-linux-gnu"}


@T.prim_func(private=False, s_tir=True)
def tile_kernel(A: T.Buffer((64, 384), "float32"), B: T.Buffer((64, 384), "float32")):
    """A 1,536-byte scratch row per parallel iteration (over TVM's 1,024-byte stack limit)."""
    T.func_attr({"global_symbol": "tile_kernel", "tirx.noalias": True})
    for i in T.parallel(64):
        with T.sblock("row"):
            vi = T.axis.spatial(64, i)
            row = T.sblock_alloc_buffer((384,), "float32")
            for j in range(384):
                with T.sblock("scale"):
                    vj = T.axis.spatial(384, j)
                    row[vj] = A[vi, vj] * T.float32(2)
            for j in range(384):
                with T.sblock("shift"):
                    vj = T.axis.spatial(384, j)
                    B[vi, 383 - vj] = row[vj] + T.float32(1)


@T.prim_func(private=False)
def sized_buffers(A: T.Buffer((8192,), "float32"), n: T.int32):
    """Buffers of 512 B, 1,536 B, 12 KiB twice, 20 KiB, a symbolic size, and "local" ones of one
    and two elements, each used once."""
    T.func_attr({"global_symbol": "sized_buffers"})
    for i in T.parallel(2):
        small = T.alloc_buffer((128,), "float32")
        tile = T.alloc_buffer((384,), "float32")
        first = T.alloc_buffer((3072,), "float32")
        second = T.alloc_buffer((3072,), "float32")
        large = T.alloc_buffer((5120,), "float32")
        dynamic = T.alloc_buffer((n,), "float32")
        scalar = T.alloc_buffer((1,), "float32", scope="local")
        row = T.alloc_buffer((2,), "float32", scope="local")
        small[i] = A[i]
        tile[i] = small[i]
        first[i] = tile[i]
        second[i] = first[i]
        large[i] = second[i]
        dynamic[i] = large[i]
        scalar[0] = dynamic[i]
        row[1] = scalar[0]
        A[i + 2] = row[1]


def marked(func) -> dict[str, bool]:
    """Buffer name -> whether its allocation carries the stack annotation."""
    found: dict[str, bool] = {}

    def visit(stmt):
        if isinstance(stmt, tvm.tirx.AllocBuffer):
            found[stmt.buffer.name] = ANNOTATION in stmt.annotations
        for field in ("seq",):
            for item in getattr(stmt, field, []) or []:
                visit(item)
        for field in ("body", "then_case", "else_case"):
            child = getattr(stmt, field, None)
            if isinstance(child, tvm.tirx.Stmt):
                visit(child)

    visit(func.body)
    return found


def test_marks_constant_buffers_between_the_stack_limit_and_the_caps():
    mod = stack_buffers(StackPolicy(max_bytes=16 * 1024, budget_bytes=16 * 1024))(tvm.IRModule({"sized_buffers": sized_buffers}))
    assert marked(mod["sized_buffers"]) == {
        "small": False,  # under 1,024 bytes: TVM keeps it on the stack itself
        "tile": True,
        "first": True,  # 1,536 + 12,288 bytes: within the 16 KiB budget
        "second": False,  # would pass the budget
        "large": False,  # over max_bytes
        "dynamic": False,  # no constant size
        "scalar": True,  # "local": TVM pools it whatever its size
        "row": False,  # "local", more than one element: left to the pool (stack_buffers.py says why)
    }


def test_unchanged_function_is_returned_as_is():
    mod = tvm.IRModule({"sized_buffers": sized_buffers})
    after = stack_buffers(StackPolicy(max_bytes=2, budget_bytes=2))(mod)  # no buffer that small
    assert not any(marked(after["sized_buffers"]).values())
    assert after["sized_buffers"].same_as(mod["sized_buffers"])


def _build(pipeline: str):
    target = tvm.target.Target(X86)
    return tvm.tirx.build(tvm.IRModule({"tile_kernel": tile_kernel}), target=target, pipeline=pipeline)


def test_stack_buffer_needs_no_workspace_call_and_computes_the_same():
    pooled, stacked = _build("default"), _build(tir_pipeline())
    assert WORKSPACE in pooled.inspect_source("ll")  # TVM's own pipeline: the pool, per iteration
    assert WORKSPACE not in stacked.inspect_source("ll")
    a = np.random.default_rng(0).standard_normal((64, 384)).astype("float32")
    want = (2 * a + 1)[:, ::-1]
    for lib in (pooled, stacked):
        b = tvm.runtime.tensor(np.zeros_like(a))
        lib["tile_kernel"](tvm.runtime.tensor(a), b)
        np.testing.assert_array_equal(b.numpy(), want)


class Expansion(nn.Module):
    """MobileNetV2's expansion: 1x1 conv 16 -> 96 with ReLU6 (its register tile is over 1 KiB)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(16, 96, 1)
        self.project = nn.Conv2d(96, 24, 1)

    def forward(self, x):
        return self.project(torch.clamp(self.conv(x), 0, 6))


def _workspace_calls(result) -> int:
    return sum(module.inspect_source("ll").count(f"@__{WORKSPACE}") for module in result.executable.mod.imports
               if module.kind == "llvm")


def test_x86_build_keeps_tiles_off_the_pool_and_verifies(tmp_path):
    require_host_features("avx512vnni", why="the tiles under test are the vpdpbusd (AVX-512 VNNI) ones")
    torch.manual_seed(0)
    path = tmp_path / "expansion.pt"
    torch.jit.save(torch.jit.script(Expansion().eval()), str(path))
    x = np.random.default_rng(1).standard_normal((1, 16, 28, 28)).astype("float32")
    outputs = {}
    for stack in (False, True):
        result = edgec.compile(edgec.load(path, (1, 16, 28, 28)), "x86", tmp_path / f"stack_{stack}", stack_buffers=stack)
        assert result.artifact.manifest["verification"]["status"] == "passed"
        outputs[stack] = LocalRunner(load_artifact(result.artifact.path)).run([x])[0]
    np.testing.assert_allclose(outputs[True], outputs[False], rtol=RTOL, atol=ATOL)

    from edgec.lower import to_relax
    from edgec.targets import resolve

    model = edgec.load(path, (1, 16, 28, 28))
    target = resolve("x86")
    calls = {stack: _workspace_calls(build(to_relax(model.graph, target), target, BuildOptions(stack_buffers=stack)))
             for stack in (False, True)}
    assert calls[True] < calls[False], calls
