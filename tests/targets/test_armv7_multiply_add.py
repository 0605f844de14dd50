"""cortex-a7 multiply-adds: LLVM's cortex-a7 model marks VFMA slow (``slowfpvfmx``)
and, with TVM's fused FP contraction, then selects neither ``vfma.f32`` nor
``vmla.f32``: every multiply-add became ``vmul.f32`` + ``vadd.f32``. The preset
turns the feature off (``-slowfpvfmx``). Checked on the armv7 assembly of a
scheduled 1x1 convolution's inner loop, against the same loop built without it.
"""

from __future__ import annotations

import tvm

from edgec.targets import resolve
from edgec.targets.schedules import default_rules, schedule_func
from edgec.targets.vector import cpu_vector
from test_lane_broadcast import KERNELS, inner_loop  # tests/targets is on the path (pytest prepends it)


def _armv7_loop(target: tvm.target.Target) -> list[str]:
    preset = resolve("cortex-a7")
    scheduled, rule = schedule_func(KERNELS["conv1x1"](), default_rules(cpu_vector(preset)))
    assert rule == "conv2d-nhwc"
    return inner_loop(scheduled, target, multiply_add=("vfma.f32", "vmul.f32"))


def test_cortex_a7_preset_turns_off_slow_vfma():
    assert "-slowfpvfmx" in resolve("cortex-a7").tvm_json["mattr"]


def test_cortex_a7_inner_loop_fuses_its_multiply_adds():
    preset = resolve("cortex-a7")
    loop = _armv7_loop(preset.tvm_target())
    fma = [op for op in loop if op.startswith("vfma.f32")]
    assert len(fma) >= 4 and all(op.split()[1].startswith("q") for op in fma)  # whole 4-lane vectors
    assert not any(op.startswith(("vmul.f32", "vadd.f32")) for op in loop)
    assert not any(op.startswith(("vstr", "vst1")) for op in loop)  # accumulators stay in registers
    assert len(loop) / len(fma) < 2.5

    llvm_default = dict(preset.tvm_json, mattr=[m for m in preset.tvm_json["mattr"] if m != "-slowfpvfmx"])
    split = _armv7_loop(tvm.target.Target(llvm_default))
    assert not any(op.startswith("vfma.f32") for op in split)
    assert sum(op.startswith("vmul.f32") for op in split) == sum(op.startswith("vadd.f32") for op in split) == len(fma)
