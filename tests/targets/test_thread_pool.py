"""edgec's parallel launch in lib.so (targets/thread_pool.c, targets/thread_pool.py): the pool's
own checks on each architecture, where it sits in lib.so, when the link leaves it out, and
the same outputs from it as from TVM's pool at any thread count. No timing is asserted; its speed
is bench/thread_pool.py's (README)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from edgec.runtimes.emulate import EMULATORS
from edgec.targets import PRESETS, linker
from edgec.targets.thread_pool import SOURCE, uses_barrier

CHECKS = Path(__file__).with_name("thread_pool_check.c")
BOARDS = ("x86", "cortex-a7", "cortex-a53")  # one preset per CPU architecture


def _tool(preset: str, name: str) -> str:
    """The binutils/gcc ``name`` for ``preset``'s code: its cross toolchain's, else the host's."""
    chain = PRESETS[preset].toolchain
    tool = f"{chain.compiler.rsplit('-', 1)[0]}-{name}" if chain is not None else name
    if shutil.which(tool) is None:
        pytest.skip(f"{tool} is not installed (make setup installs it)")
    return tool


@pytest.mark.parametrize("preset", BOARDS)
def test_pool_checks_pass(preset, tmp_path):
    """Every share runs once; a worker runs its share; a worker that does not wake leaves its share
    to the caller; a failing share fails the launch; a launch inside a share runs alone; a forked
    child starts workers of its own (tests/targets/thread_pool_check.c). ARM code runs under
    qemu-user-static, as the emulated boards' verification does (Debian's dynamic qemu-user 7.2
    aborts when a forked child starts a thread, a QEMU fault, not the pool's)."""
    compiler = _tool(preset, "gcc")
    emulator = EMULATORS[PRESETS[preset].cpu_arch]
    runner = () if emulator.qemu is None else (emulator.qemu, "-L", emulator.sysroot)
    if runner and shutil.which(emulator.qemu) is None:
        pytest.skip(f"{emulator.qemu} is not installed (make setup installs it)")
    program = tmp_path / "thread_pool_check"
    subprocess.run(
        [compiler, "-std=gnu11", "-O2", "-Wall", "-Werror", f"-I{SOURCE.parent}", str(CHECKS), "-o", str(program)],
        check=True,
    )
    done = subprocess.run(
        [*runner, str(program)], capture_output=True, text=True, timeout=120,
        env={**os.environ, "TVM_NUM_THREADS": "2"}, check=False,
    )  # fmt: skip
    assert (done.returncode, done.stdout.strip()) == (0, "ok"), done.stderr


@pytest.mark.parametrize(("name", "target"), [("mobilenet", "x86"), ("mobilenet", "cortex-a7"), ("resnet", "cortex-a53")])
def test_lib_so_keeps_its_launch_from_tvms_loader(artifacts, name, target):
    """lib.so defines __TVMBackendParallelLaunch itself, as a local symbol: TVM's loader, which fills
    the pointer it finds by name in the dynamic table, cannot replace it. It needs no newer glibc
    than the kernels did (thread_pool.c binds pthread_create, pthread_join, pthread_once and dlsym
    to their first versions, not to the cross toolchains' glibc 2.36)."""
    nm = _tool(target, "nm")  # skips before a build without the toolchain
    lib = artifacts.get(name, target).artifact.lib
    dynamic = subprocess.run([nm, "-D", str(lib)], capture_output=True, text=True, check=True).stdout
    assert "__TVMBackendParallelLaunch" not in dynamic
    assert "__tvm_ffi__library_bin" in dynamic  # what the loader reads by name is still there
    every = subprocess.run([nm, str(lib)], capture_output=True, text=True, check=True).stdout
    assert re.search(r"^\S+ d __TVMBackendParallelLaunch$", every, re.M), "no local definition of the launch"
    versions = subprocess.run([_tool(target, "objdump"), "-T", str(lib)], capture_output=True, text=True, check=True)
    needed = {tuple(map(int, v.split("."))) for v in re.findall(r"GLIBC_(\d+\.\d+)", versions.stdout)}
    assert needed and max(needed) <= (2, 17), sorted(needed)


def _objects(tmp_path: Path, barrier: bool) -> list[str]:
    """One object as TVM's code generator leaves it: the launch pointer declared weak, and the
    barrier's when the kernels call it."""
    names = ["__TVMBackendParallelLaunch", *(["__TVMBackendParallelBarrier"] if barrier else [])]
    source = tmp_path / "kernels.c"
    source.write_text("".join(f"__attribute__((weak)) void* {n};\nvoid* read{i}(void) {{ return {n}; }}\n" for i, n in enumerate(names)))
    subprocess.run(["gcc", "-c", "-fPIC", str(source), "-o", str(tmp_path / "kernels.o")], check=True)
    return [str(tmp_path / "kernels.o")]


@pytest.mark.parametrize("barrier", [False, True])
def test_link_adds_the_pool_unless_kernels_use_the_barrier(tmp_path, barrier):
    objects = _objects(tmp_path, barrier)
    assert uses_barrier(objects) is barrier
    linker(PRESETS["x86"])(str(tmp_path / "lib.so"), objects)
    symbols = subprocess.run(["nm", str(tmp_path / "lib.so")], capture_output=True, text=True, check=True).stdout
    dynamic = subprocess.run(["nm", "-D", str(tmp_path / "lib.so")], capture_output=True, text=True, check=True).stdout
    if barrier:  # TVM's pool: the pointer stays the loader's to fill
        assert "__TVMBackendParallelLaunch" in dynamic
    else:
        assert re.search(r" d __TVMBackendParallelLaunch$", symbols, re.M)
        assert "__TVMBackendParallelLaunch" not in dynamic


KERNEL = """
typedef struct { void* sync_handle; int num_task; } Env;
__attribute__((weak)) int (*__TVMBackendParallelLaunch)(int (*)(int, Env*, void*), void*, int);
static int share(int task, Env* env, void* data) { ((int*)data)[task] += env->num_task; return 0; }
int run(int* out) { return __TVMBackendParallelLaunch(share, out, 0); }
"""

UNLOAD = """
import ctypes, _ctypes, sys, time
lib = ctypes.CDLL(sys.argv[1])
out = (ctypes.c_int * 2)()
assert lib.run(out) == 0 and list(out) == [2, 2], list(out)
_ctypes.dlclose(lib._handle)  # the worker is spinning: it must be gone before lib.so's code is
time.sleep(0.1)
print("ok")
"""


def test_unloading_lib_so_stops_its_workers_first(tmp_path):
    """A kernel run on two threads, then lib.so unloaded (dlclose) while the worker still spins
    after the launch: the pool's destructor stops and joins its workers before the code goes
    (without it, the worker ran unmapped code: SIGSEGV)."""
    source = tmp_path / "kernel.c"
    source.write_text(KERNEL)
    subprocess.run(["gcc", "-c", "-fPIC", str(source), "-o", str(tmp_path / "kernel.o")], check=True)
    linker(PRESETS["x86"])(str(tmp_path / "lib.so"), [str(tmp_path / "kernel.o")])
    done = subprocess.run(
        [sys.executable, "-c", UNLOAD, str(tmp_path / "lib.so")], capture_output=True, text=True, timeout=60,
        env={**os.environ, "TVM_NUM_THREADS": "2"}, check=False,
    )  # fmt: skip
    assert (done.returncode, done.stdout.strip()) == (0, "ok"), done.stderr


RUN = """
import json, sys
import numpy as np
from edgec.core.artifact import load_artifact
from edgec.runtimes.local import LocalRunner
artifact = load_artifact(sys.argv[1])
print(json.dumps(LocalRunner(artifact).run([np.load(sys.argv[2])])[0].tolist()))
"""


def test_same_outputs_from_either_pool_at_any_thread_count(artifacts, saved_models, tmp_path):
    """MobileNet's outputs, each run in a fresh process: edgec's pool at 1, 2 and 5 threads (5: more
    workers than this machine's CPUs, so shares are claimed late and by whoever is free), and TVM's
    pool (EDGEC_THREAD_POOL=tvm) at 2. A share computes the same elements whoever runs it: equal."""
    lib_dir = artifacts.get("mobilenet", "x86").artifact.path
    example = tmp_path / "x.npy"
    np.save(example, saved_models["mobilenet"].example)
    outputs = {}
    for pool, threads in (("edgec", 1), ("edgec", 2), ("edgec", 5), ("tvm", 2)):
        env = {**os.environ, "TVM_NUM_THREADS": str(threads), "EDGEC_THREAD_POOL": pool}
        done = subprocess.run(
            [sys.executable, "-c", RUN, str(lib_dir), str(example)], capture_output=True, text=True, env=env,
            timeout=300, check=False,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        outputs[pool, threads] = np.array(json.loads(done.stdout.splitlines()[-1]), dtype=np.float32)
    reference = outputs["edgec", 1]
    np.testing.assert_allclose(reference, saved_models["mobilenet"].torch_outputs(saved_models["mobilenet"].example), rtol=1e-4, atol=1e-4)
    for key, output in outputs.items():
        np.testing.assert_array_equal(output, reference, err_msg=f"{key}")
