"""How the graph rewrites fail without failing a build: a pass that raises is skipped
(``guarded``), and a fallback names the op it left alone by its shapes (``describe_call``);
why a rewrite of channels-last convolutions leaves one alone (``not_channels_last_conv``)."""

from __future__ import annotations

from edgec.core.fallbacks import ALL_KERNELS, FallbackLog


def guarded(inner, rule: str, fallbacks: FallbackLog):
    """``inner`` (a module pass), except that when it raises, the module passes on unchanged
    and the failure is recorded as a fallback of every kernel (``*``) for ``rule``."""
    import tvm

    @tvm.transform.module_pass(opt_level=0, name="EdgecGuarded")
    def _pass(mod, _ctx):
        snapshot = mod.clone()  # Python passes update the module they get in place
        try:
            return inner(mod)
        except Exception as error:  # noqa: BLE001 - any failure of a rewrite: skip the rewrite
            fallbacks.add(ALL_KERNELS, rule, error, "the graph passes on without this rewrite")
            return snapshot

    return _pass


def describe_call(call) -> str:
    """``relax.nn.conv2d(1x3x224x224, 64x3x7x7) -> 1x64x112x112``: an op and its shapes, how a
    fallback names the region a graph rewrite left alone (no kernel names exist yet)."""
    op = getattr(call.op, "name", None) or getattr(call.op, "name_hint", None) or str(call.op)
    arguments = ", ".join(_describe_type(getattr(arg, "ty", None)) for arg in call.args)
    return f"{op}({arguments}) -> {_describe_type(getattr(call, 'ty', None))}"


def _describe_type(ty) -> str:
    from tvm import relax, tirx

    if isinstance(ty, relax.TupleType):
        return "(" + ", ".join(_describe_type(field) for field in ty.fields) + ")"
    shape = getattr(ty, "shape", None)
    if isinstance(ty, relax.TensorType) and shape is not None:
        return "x".join(str(int(dim)) if isinstance(dim, tirx.IntImm) else str(dim) for dim in shape) or "scalar"
    return "?"


def not_channels_last_conv(call, weight) -> str | None:
    """Why the Relax conv2d ``call`` is not a groups-1 NHWC/HWIO convolution with constant
    weights (``weight``: their NumPy value, None when not a constant), or None."""
    attrs = call.attrs
    if weight is None:
        return "the weights are not a constant"
    layouts = (attrs.data_layout, attrs.kernel_layout, attrs.out_layout)
    if layouts != ("NHWC", "HWIO", "NHWC"):
        return f"layouts {layouts}, not NHWC/HWIO"
    if int(attrs.groups) != 1:
        return f"groups={int(attrs.groups)}"
    return None
