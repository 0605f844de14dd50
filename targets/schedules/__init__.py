"""edgec's CPU schedule library: hand-written TIR schedules for the hot ops of CNNs.

TVM 0.27's default Relax build for CPUs schedules nothing: every kernel is the
naive single-threaded loop nest LegalizeOps writes. These rules fix that
without any tuning. One module per op family, tried in this order (the first
that matches a kernel schedules it):

    winograd_schedule.py  Winograd input/output transforms   tiles parallel, elements unrolled
    conv2d_int8.py  uint8 x int8 conv2d, packed weights  vpdpbusd (VNNI CPUs only)
    conv2d_dot.py int8 dot-product conv2d (sdot)    register tile, 4 input channels per lane
    conv2d.py     conv2d NHWC/HWIO, groups 1        register tile, weights or pixels stationary
    depthwise.py  depthwise conv2d NHWC             channels vectorised, pixels register-tiled
    grouped.py    grouped conv2d NHWC, 1<groups<C   conv2d's register tile, per group
    dense.py      matmul / Linear, [k, n] weights   like a 1x1 conv
    pooling.py    max/avg pool, mean, channel-last reductions
    generic.py    everything else                   parallel + vectorised, or parallel only

``graph.py`` prepares the Relax graph first (channels-last layout, BN as a
fused scale/shift); on aarch64 ``narrow_indices.py`` gives the legalized
kernels int32 indices before the rules run. The rules tile for a ``CpuVector``
(``edgec.targets.vector.cpu_vector(target)``: the preset's data, or the
compiling machine's CPU features).
"""

from __future__ import annotations

import logging
from typing import Any

from edgec.core.fallbacks import FallbackLog
from edgec.targets.schedules.common import Rule, is_scheduled
from edgec.targets.schedules.narrow_indices import narrow_indices, narrow_indices_pass, narrows_indices
from edgec.targets.vector import CpuVector

log = logging.getLogger(__name__)

__all__ = [
    "Rule", "apply_schedules", "default_rules", "graph_passes", "is_scheduled", "narrow_indices", "narrow_indices_pass",
    "narrows_indices",
]


def default_rules(vector: CpuVector) -> list[Rule]:
    """The rules in the order they are tried."""
    from edgec.targets.schedules.conv2d import Conv2DNHWC
    from edgec.targets.schedules.conv2d_dot import Conv2DDot
    from edgec.targets.schedules.conv2d_pair import Conv2DPair
    from edgec.targets.schedules.conv2d_int8 import Conv2DInt8Dot
    from edgec.targets.schedules.dense import Dense
    from edgec.targets.schedules.depthwise import DepthwiseConv2DNHWC
    from edgec.targets.schedules.generic import Generic
    from edgec.targets.schedules.grouped import GroupedConv2DNHWC
    from edgec.targets.schedules.pooling import Pooling
    from edgec.targets.schedules.winograd_schedule import WinogradTransforms

    int8_dot = [Conv2DInt8Dot(vector)] if vector.int8_dot else []
    return [
        WinogradTransforms(vector), *int8_dot, Conv2DDot(vector), Conv2DPair(vector), Conv2DNHWC(vector), DepthwiseConv2DNHWC(vector),
        GroupedConv2DNHWC(vector), Dense(vector), Pooling(vector), Generic(vector),
    ]  # fmt: skip


def graph_passes(vector: CpuVector | None = None, fallbacks: FallbackLog | None = None, winograd=None) -> list:
    """graph.py's passes for ``vector``; ``winograd``: a WinogradPolicy, None for none."""
    from edgec.targets.schedules.graph import graph_passes as passes

    return passes(vector.lanes if vector else None, fallbacks, winograd, bool(vector and vector.lane_fma),
                  int8_dot=bool(vector and vector.int8_dot), dot_product=bool(vector and vector.dot_product),
                  packed_weights=vector if vector and vector.lane_fma else None,
                  pair_product=bool(vector and vector.pair_product),
                  packed_matvec=vector if vector and vector.packed_matvec else None, vector=vector)


def first_schedule(
    func, rules: list[Rule], kernel: str = "", fallbacks: FallbackLog | None = None, skip: frozenset[str] = frozenset()
) -> tuple[Any, str | None]:
    """(s_tir.Schedule, rule name) of the first rule that matches ``func`` and succeeds, else (None, None).

    A rule that raises falls back to the rules after it (TVM's default loop nest when none
    is left); ``fallbacks`` (optional) records it under ``kernel``. Rules named in ``skip``
    are not tried (they failed on this kernel later in an earlier build).
    """
    failed = []
    found: tuple[Any, str | None] = (None, None)
    for rule in rules:
        if rule.name in skip:
            continue
        try:
            sch = rule.apply(func)
        except Exception as error:  # noqa: BLE001 - a schedule primitive refused: try the next rule
            failed.append((rule.name, error))
            continue
        if sch is not None:
            found = (sch, rule.name)
            break
    for name, error in failed:
        instead = f"scheduled by {found[1]}" if found[1] else "left as TVM's default loop nest"
        if fallbacks is not None:
            fallbacks.add(kernel or "?", name, error, instead)
        else:
            log.debug("schedule rule %s failed on %s: %s; %s", name, kernel or "a kernel", error, instead)
    return found


def schedule_func(func, rules: list[Rule], **kwargs) -> tuple[Any, str | None]:
    """(scheduled PrimFunc, rule name) for the first rule that matches and succeeds, else (func, None);
    ``kwargs`` as for ``first_schedule``."""
    sch, name = first_schedule(func, rules, **kwargs)
    if sch is None:
        return func, None
    return sch.mod["main"].with_attr("tirx.is_scheduled", True), name


def apply_schedules(
    rules: list[Rule],
    report: dict[str, str | None],
    fallbacks: FallbackLog | None = None,
    skip: dict[str, frozenset[str]] | None = None,
):
    """A module pass scheduling every not-yet-scheduled PrimFunc; ``report[kernel] = rule name``
    (``None``: no rule applied, the kernel stays the naive loop nest). ``fallbacks`` records
    rules that failed; ``skip[kernel]`` names rules not to try on that kernel."""
    import tvm
    from tvm import tirx

    from edgec.ops.common import CUSTOM_KERNEL_ATTR

    skip = skip or {}

    @tvm.transform.module_pass(opt_level=0, name="EdgecCpuSchedules")
    def _pass(mod, _ctx):
        updates = {}
        for gvar, func in mod.functions_items():
            if not isinstance(func, tirx.PrimFunc):
                continue
            if is_scheduled(func):
                # scheduled before: by a custom op's own lowering, else by the tuning database
                custom = CUSTOM_KERNEL_ATTR in func.attrs
                report.setdefault(gvar.name_hint, "custom-op" if custom else "tuning-db")
                continue
            name = gvar.name_hint
            scheduled, rule = schedule_func(
                func, rules,
                kernel=name, fallbacks=fallbacks, skip=skip.get(name, frozenset()),
            )
            report[name] = rule
            if rule is None:
                log.info("kernel %s: no schedule rule applies; left as the naive loop nest", name)
            else:
                log.debug("kernel %s: scheduled by %s", name, rule)
                updates[gvar] = scheduled
        for gvar, func in updates.items():
            mod[gvar] = func
        return mod

    return _pass
