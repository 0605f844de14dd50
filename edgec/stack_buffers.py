"""Kernels' small scratch buffers on the stack instead of TVM's workspace pool (CPU builds).

TVM lowers every buffer a kernel allocates (a tile's accumulator, a padded row) to a
``TVMBackendAllocWorkspace`` / ``TVMBackendFreeWorkspace`` pair unless it is a constant
size under ``kMaxStackAlloca`` (1,024 bytes, fixed in TVM's C++ LowerTVMBuiltin) in the
"global" scope: a "local" buffer goes to the pool whatever its size. A
register tile of 8 pixels x 48 channels is 1,536 bytes: it is allocated and freed on the
heap pool once per iteration of the kernel's parallel loop. MobileNetV2 made 12,167 such
calls per inference (1,024-1,536 bytes each) and spent about 5% of its run in the pool
(``perf record -e cpu-clock`` of ``invoke_stateful``, x86, one thread).

The int8 dot-product kernels (targets/schedules/conv2d_int8.py) lost the same way to a
4-byte "local" buffer, their tensor intrinsic's broadcast operand: one pool call per tile,
3-4% of MobileNetV2's int8 run on x86.

This pass marks each constant-size CPU buffer TVM would pool (``marks``) of at most
``max_bytes`` with TVM's ``disable_lower_builtin`` annotation, which LowerTVMBuiltin reads
as "keep it a stack allocation"; LLVM then places it in the frame of the function (or
parallel task) once. The buffers of one function together stay under ``budget_bytes``
(counted as if all were live at once): a parallel task runs on a worker thread's stack.
It runs after TVM's TIR pipeline (StorageRewrite drops allocation annotations) and before
the host finalisation that runs LowerTVMBuiltin: ``tir_pipeline()`` registers that order
under ``PIPELINE`` for ``relax.build(..., tir_pipeline=PIPELINE)``.

TIR statements are rebuilt only through the containers a buffer can sit in (sequences,
loops, attributes, branches); a subtree of any other kind is left as it is, so its
buffers keep the workspace pool (slower, never wrong).
"""

from __future__ import annotations

import dataclasses

ANNOTATION = "disable_lower_builtin"  # TVM's transform::kDisableLowerTVMBuiltin
MAX_STACK_ALLOCA = 1024  # TVM's runtime::kMaxStackAlloca: smaller buffers are on the stack already
PIPELINE = "edgec-stack-buffers"


@dataclasses.dataclass(frozen=True)
class StackPolicy:
    """Which buffers go on the stack: each at most ``max_bytes``, at most ``budget_bytes`` per
    function (worker threads have glibc's default 8 MiB stacks, also on the boards)."""

    max_bytes: int = 16 * 1024
    budget_bytes: int = 64 * 1024


def buffer_bytes(buffer) -> int | None:
    """Bytes of a buffer of constant shape, None when a dimension is symbolic."""
    total = buffer.dtype.bits * buffer.dtype.lanes // 8
    for extent in buffer.shape:
        if not hasattr(extent, "value"):
            return None
        total *= int(extent.value)
    return total


# "local" buffers marked: one element at most (the int8 intrinsic's 4-byte operand, which LLVM
# then keeps in a register). Marking longer ones broke the binary kernels' per-row bit planes (a
# "local" row inside the parallel loop, ops/binary/kernels.py): wrong outputs on x86 and on the
# emulated cortex-a7 (tests/ops/test_binary_ops.py, tests/passes/test_lower_binary.py), rows of
# 64 bytes too; not understood yet: one buffer shared by the parallel tasks is the first suspect.
MAX_LOCAL_BYTES = 8


def marks(buffer, size: int, policy: StackPolicy) -> bool:
    """Whether this pass keeps ``buffer`` (``size`` bytes, constant) on the stack: a "global" one
    that TVM's LowerTVMBuiltin would pool (``kMaxStackAlloca`` bytes or more); a "local" one (TVM
    pools every "local" buffer on a CPU, e.g. the int8 dot-product intrinsic's 4-byte broadcast
    operand, once per tile) when it is one element of at most MAX_LOCAL_BYTES; either within
    ``policy.max_bytes``."""
    if size > policy.max_bytes:
        return False
    if buffer.scope() == "global":
        return size >= MAX_STACK_ALLOCA
    return buffer.scope() == "local" and size <= MAX_LOCAL_BYTES and all(int(extent) == 1 for extent in buffer.shape)


def stack_buffers(policy: StackPolicy | None = None):
    """The TIR pass (a PrimFunc pass) described in the module docstring."""
    import tvm
    from tvm import tirx

    policy = policy or StackPolicy()

    def rewrite_function(func, _mod, _ctx):
        if not _is_cpu(func):
            return func
        left = [policy.budget_bytes]

        def visit(stmt):
            if isinstance(stmt, tirx.AllocBuffer):
                return _annotate(stmt, policy, left)
            if isinstance(stmt, tirx.SeqStmt):
                seq = [visit(item) for item in stmt.seq]
                return stmt if all(new.same_as(old) for new, old in zip(seq, stmt.seq)) else tirx.SeqStmt(seq, stmt.span)
            if isinstance(stmt, tirx.For):
                body = visit(stmt.body)
                if body.same_as(stmt.body):
                    return stmt
                return tirx.For(stmt.loop_var, stmt.min, stmt.extent, stmt.kind, body, stmt.thread_binding,
                                stmt.annotations, getattr(stmt, "step", None), stmt.span)
            if isinstance(stmt, tirx.AttrStmt):
                body = visit(stmt.body)
                return stmt if body.same_as(stmt.body) else tirx.AttrStmt(stmt.node, stmt.attr_key, stmt.value, body, stmt.span)
            if isinstance(stmt, tirx.IfThenElse):
                then_case = visit(stmt.then_case)
                else_case = visit(stmt.else_case) if stmt.else_case is not None else None
                if then_case.same_as(stmt.then_case) and (else_case is None or else_case.same_as(stmt.else_case)):
                    return stmt
                return tirx.IfThenElse(stmt.condition, then_case, else_case, stmt.span)
            if isinstance(stmt, tirx.While):
                body = visit(stmt.body)
                return stmt if body.same_as(stmt.body) else tirx.While(stmt.condition, body, stmt.span)
            return stmt

        body = visit(func.body)
        return func if body.same_as(func.body) else func.with_body(body)

    return tvm.tirx.transform.prim_func_pass(rewrite_function, opt_level=0, name="EdgecStackBuffers")


def _is_cpu(func) -> bool:
    target = func.attrs.get("target") if func.attrs is not None else None
    return target is None or target.kind.name in ("llvm", "c")


def _annotate(stmt, policy: StackPolicy, left: list[int]):
    from tvm import tirx

    buffer = stmt.buffer
    size = buffer_bytes(buffer)
    if size is None or not marks(buffer, size, policy):
        return stmt
    if size > left[0] or ANNOTATION in stmt.annotations:
        return stmt
    left[0] -= size
    return tirx.AllocBuffer(buffer, {**dict(stmt.annotations), ANNOTATION: tirx.const(True, "bool")}, stmt.span)


def tir_pipeline(policy: StackPolicy | None = None) -> str:
    """Register (again) TVM's default CPU TIR pipeline followed by ``stack_buffers``; return its name."""
    import tvm
    from tvm.tirx import compilation_pipeline

    def factory():
        pipeline, finalize_host, finalize_device = compilation_pipeline.get_tir_pipeline("s_tir")
        return tvm.transform.Sequential([pipeline, stack_buffers(policy)], name=PIPELINE), finalize_host, finalize_device

    compilation_pipeline.register_tir_pipeline(PIPELINE, factory)
    return PIPELINE
