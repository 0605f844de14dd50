"""CUDA on this machine: load what TVM's CUDA runtime needs, find the GPU, serve compiled kernels.

The apache-tvm wheel ships ``tvm/lib/libtvm_runtime_cuda.so``, linked against the CUDA 13
runtime (``libcudart.so.13``) and the NVIDIA driver (``libcuda.so.1``). ``import tvm`` tries
to load it (``tvm/backend/cuda/__init__.py``) and moves on silently when it cannot; then no
CUDA device exists and no CUDA module loads. :func:`gpu` loads it as TVM does, in this
order, and names the first missing piece in one ``no CUDA device: ...`` error:

1. ``libcudart.so.13``, preloaded with RTLD_GLOBAL so that the dlopen of TVM's library
   finds it: from NVIDIA's ``nvidia-cuda-runtime`` wheel (``site-packages/nvidia/cu13/lib``,
   the ``[cuda]`` extra), ``$CUDA_HOME`` or ``$CUDA_PATH``, ``/usr/local/cuda``, or wherever
   the dynamic loader looks (LD_LIBRARY_PATH, ldconfig);
2. ``libcuda.so.1``: only the GPU driver installs it;
3. ``libtvm_runtime_cuda.so`` (RTLD_LOCAL, as TVM loads it): registers ``device_api.cuda``,
   the CUDA timer and the loader of CUDA modules;
4. a GPU, asked of the driver (``cuInit``, ``cuDriverGetVersion``, ``cuDeviceGetCount``).

Kernels: edgec builds CUDA artifacts with TVM's source fallback (edgec/build.py), so the
CUDA module inside ``lib.so`` holds the kernels' CUDA source, which TVM compiles when
``lib.so`` is loaded, through the global function ``tvm_callback_cuda_compile``. edgec
answers it (:func:`compile_kernels`): with the artifact's ``kernels.fatbin`` (compiled by
nvcc at ``edgec compile`` time: machine code for the artifact's arch plus PTX, which the
driver compiles for newer GPUs) when the source is the one that fatbin was compiled from;
otherwise with nvcc, or NVRTC (``cuda-bindings``), on this machine. A GPU machine thus
needs only the driver and libcudart to run an artifact whose kernels nvcc compiled.
"""

from __future__ import annotations

import ctypes
import dataclasses
import hashlib
import json
import logging
import os
import re
import shutil
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from edgec.core.errors import ArtifactError, NoCudaDeviceError

log = logging.getLogger(__name__)

CUDART = "libcudart.so.13"
DRIVER = "libcuda.so.1"
TVM_CUDA_RUNTIME = "libtvm_runtime_cuda.so"
MIN_DRIVER_CUDA = 13000  # cuDriverGetVersion of a driver that runs CUDA 13 code (R580 or newer)
KERNELS_SOURCE = "kernels.cu"
KERNELS_BINARY = "kernels.fatbin"
RPC_KERNELS_PREFIX = "edgec_kernels_"  # on an RPC server: edgec_kernels_<sha256 of the source>.fatbin
CUDA_SUCCESS = 0
INSTALL_HINT = "pip install -e '.[cuda]' (NVIDIA's nvidia-cuda-runtime wheel)"

# (file or soname, dlopen mode) -> library handle; raises OSError when it cannot load
Opener = Callable[[str, int], Any]


@dataclasses.dataclass(frozen=True)
class Gpu:
    """GPU 0 as TVM's CUDA runtime sees it, and the CUDA pieces that were loaded for it."""

    name: str
    compute_capability: tuple[int, int]
    driver_cuda: tuple[int, int]  # the newest CUDA version the driver runs
    cudart: str  # the libcudart.so.13 in use

    @property
    def arch(self) -> str:
        return f"sm_{self.compute_capability[0]}{self.compute_capability[1]}"

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "arch": self.arch,
            "compute_capability": ".".join(map(str, self.compute_capability)),
            "driver_cuda": ".".join(map(str, self.driver_cuda)),
            "cudart": self.cudart,
        }


# --- loading ---------------------------------------------------------------------------

_HANDLES: list[Any] = []  # libraries edgec loaded stay loaded for the life of the process
_STATE: dict[str, Any] = {}  # "gpu": Gpu, or "failure": the message of the first attempt


def cudart_dirs(paths: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> list[Path]:
    """The existing directories searched for libcudart.so.13, in order: each ``sys.path``
    entry's ``nvidia/cu13/lib`` (the pip wheel), ``$CUDA_HOME`` and ``$CUDA_PATH``
    (``lib64``, ``lib``), ``/usr/local/cuda/lib64``."""
    paths = sys.path if paths is None else paths
    environ = os.environ if environ is None else environ
    candidates = [Path(entry) / "nvidia" / "cu13" / "lib" for entry in paths if entry]
    for variable in ("CUDA_HOME", "CUDA_PATH"):
        if environ.get(variable):
            root = Path(environ[variable])
            candidates += [root / "lib64", root / "lib"]
    candidates.append(Path("/usr/local/cuda/lib64"))
    found: list[Path] = []
    for directory in candidates:
        if directory.is_dir() and directory.resolve() not in {known.resolve() for known in found}:
            found.append(directory)
    return found


def load_cudart(dirs: Sequence[Path], opener: Opener) -> str:
    """Preload libcudart.so.13 (RTLD_GLOBAL) from the first of ``dirs`` that has a loadable
    one, else by soname (the dynamic loader's search); returns what was loaded."""
    tried = []
    for candidate in [str(Path(directory) / CUDART) for directory in dirs if (Path(directory) / CUDART).is_file()] + [CUDART]:
        try:
            _HANDLES.append(opener(candidate, ctypes.RTLD_GLOBAL))
        except OSError as error:
            tried.append(f"{candidate} ({_first_line(error)})")
            continue
        log.info("CUDA runtime: %s", candidate)
        return candidate
    where = ", ".join(str(directory) for directory in dirs) or "no CUDA directory exists"
    raise NoCudaDeviceError(
        f"the CUDA 13 runtime {CUDART} is not installed (searched {where}, then the dynamic loader's path; "
        f"tried: {'; '.join(tried)}); install it with: {INSTALL_HINT}"
    )


def load_driver(opener: Opener):
    """The NVIDIA driver's libcuda.so.1 (RTLD_GLOBAL), or a NoCudaDeviceError saying it is missing."""
    try:
        driver = opener(DRIVER, ctypes.RTLD_GLOBAL)
    except OSError as error:
        detail = "" if "No such file" in str(error) else f" ({_first_line(error)})"
        raise NoCudaDeviceError(
            f"the NVIDIA driver library {DRIVER} is not on this machine{detail}; it comes with the GPU driver, "
            "not from pip: run on a machine with an NVIDIA GPU and its driver (R580 or newer)"
        ) from None
    _HANDLES.append(driver)
    return driver


def probe_driver(driver) -> tuple[int, tuple[int, int]]:
    """Ask the driver for GPUs: (count, newest CUDA version it runs), or a NoCudaDeviceError."""
    status = driver.cuInit(0)
    if status != CUDA_SUCCESS:
        raise NoCudaDeviceError(
            f"the NVIDIA driver found no usable GPU (cuInit: {_error_name(driver, status)}); `nvidia-smi` shows what it sees"
        )
    version = ctypes.c_int(0)
    status = driver.cuDriverGetVersion(ctypes.byref(version))
    if status != CUDA_SUCCESS:
        raise NoCudaDeviceError(f"the NVIDIA driver did not tell its CUDA version (cuDriverGetVersion: {_error_name(driver, status)})")
    cuda_version = (version.value // 1000, version.value % 1000 // 10)
    if version.value < MIN_DRIVER_CUDA:
        raise NoCudaDeviceError(
            f"the NVIDIA driver runs CUDA up to {cuda_version[0]}.{cuda_version[1]}, but TVM's CUDA runtime is built "
            "for CUDA 13: update the driver to R580 or newer"
        )
    count = ctypes.c_int(0)
    status = driver.cuDeviceGetCount(ctypes.byref(count))
    if status != CUDA_SUCCESS or count.value < 1:
        detail = _error_name(driver, status) if status != CUDA_SUCCESS else "0 devices"
        raise NoCudaDeviceError(f"the NVIDIA driver sees no GPU (cuDeviceGetCount: {detail})")
    return count.value, cuda_version


def load_tvm_cuda_runtime(opener: Opener) -> None:
    """Load TVM's libtvm_runtime_cuda.so unless ``import tvm`` already did."""
    import tvm

    if tvm.get_global_func("device_api.cuda", allow_missing=True) is not None:
        return
    path = Path(tvm.__file__).parent / "lib" / TVM_CUDA_RUNTIME
    try:
        _HANDLES.append(opener(str(path), ctypes.RTLD_LOCAL))
    except OSError as error:
        raise NoCudaDeviceError(f"TVM's CUDA runtime {path} did not load: {_first_line(error)}") from None
    if tvm.get_global_func("device_api.cuda", allow_missing=True) is None:
        raise NoCudaDeviceError(f"{path} loaded but registered no CUDA device API; reinstall apache-tvm")


def gpu() -> Gpu:
    """GPU 0, with TVM's CUDA runtime loaded and edgec's kernel compiler installed; loaded
    once per process. Raises NoCudaDeviceError naming the missing piece (the same one again
    on later calls: what is installed does not change under a running process)."""
    if "gpu" in _STATE:
        return _STATE["gpu"]
    if "failure" in _STATE:
        raise NoCudaDeviceError(_STATE["failure"])
    try:
        found = _load(cudart_dirs(), _dlopen)
    except NoCudaDeviceError as error:
        _STATE["failure"] = str(error).removeprefix("no CUDA device: ")
        raise
    _STATE["gpu"] = found
    return found


def _load(dirs: Sequence[Path], opener: Opener) -> Gpu:
    import tvm

    cudart = _mapped(CUDART) or load_cudart(dirs, opener)  # import tvm may have loaded one already
    driver = load_driver(opener)
    load_tvm_cuda_runtime(opener)
    install_compile_callback()
    _count, driver_cuda = probe_driver(driver)
    device = tvm.cuda(0)
    if not device.exist:
        raise NoCudaDeviceError(
            f"the driver reports a GPU (CUDA {driver_cuda[0]}.{driver_cuda[1]}) but TVM's CUDA runtime cannot open it "
            f"with {cudart}"
        )
    major, minor = (int(part) for part in str(device.compute_version).split(".")[:2])
    found = Gpu(str(device.device_name), (major, minor), driver_cuda, _mapped(CUDART) or cudart)
    log.info("GPU 0: %s", found.as_dict())
    return found


def gpu_info_json() -> str:
    """``edgec.device.cuda`` on a device: ``{"ok": true, name, arch, ...}`` or ``{"ok": false, "reason": ...}``."""
    try:
        return json.dumps({"ok": True, **gpu().as_dict()})
    except NoCudaDeviceError as error:
        return json.dumps({"ok": False, "reason": str(error)})


def _dlopen(name: str, mode: int):
    return ctypes.CDLL(name, mode=mode)


def _mapped(soname: str) -> str | None:
    """The path of ``soname`` if this process has it loaded (``/proc/self/maps``)."""
    try:
        lines = Path("/proc/self/maps").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        fields = line.split(maxsplit=5)  # address perms offset device inode path
        if len(fields) == 6 and fields[5].endswith("/" + soname):
            return fields[5]
    return None


def _error_name(driver, status: int) -> str:
    name = ctypes.c_char_p()
    try:
        if driver.cuGetErrorName(status, ctypes.byref(name)) == CUDA_SUCCESS and name.value:
            return f"{name.value.decode()} ({status})"
    except (AttributeError, OSError):
        pass
    return f"error {status}"


def _first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__


# --- which artifact runs on which GPU ---------------------------------------------------

_ARCH = re.compile(r"^sm_(\d+)(\d)([a-z]?)$")


def compute_capability(arch: str) -> tuple[int, int]:
    """``sm_86`` -> (8, 6); ``sm_90a`` -> (9, 0); ``sm_100`` -> (10, 0)."""
    match = _ARCH.match(arch)
    if match is None:
        raise ArtifactError(f"bad CUDA arch {arch!r} in the artifact: expected sm_XY; recompile it")
    return int(match.group(1)), int(match.group(2))


def check_arch(arch: str, gpu: Mapping[str, Any], what: str) -> None:
    """Refuse a build whose kernels cannot run on ``gpu`` (a :meth:`Gpu.as_dict`, local or remote).

    Code for ``sm_XY`` runs on compute capability X.Y and newer (the PTX in the fatbin, or
    the source, is compiled for the newer GPU); ``sm_XYa`` uses that GPU's own features
    and runs on X.Y only.
    """
    wanted, have = compute_capability(arch), compute_capability(gpu["arch"])
    if not (have == wanted if arch.endswith("a") else have >= wanted):
        raise ArtifactError(
            f"{what} is compiled for {arch}, but the GPU ({gpu['name']}) is {gpu['arch']}; "
            f"compile for it with -t cuda:arch={gpu['arch']}"
        )


def unavailable_reason(arch: str) -> str | None:
    """Why a CUDA build for ``arch`` cannot run here (None: it can, on GPU 0)."""
    try:
        check_arch(arch, gpu().as_dict(), "the build")
    except (NoCudaDeviceError, ArtifactError) as error:
        return str(error)
    return None


# --- kernels ---------------------------------------------------------------------------

_KERNELS: dict[str, bytes] = {}  # sha256 of a CUDA source -> the fatbin nvcc compiled from it


def source_key(source: str) -> str:
    return hashlib.sha256(source.encode()).hexdigest()


def artifact_kernels(directory: Path) -> tuple[str, bytes] | None:
    """(kernels.cu text, kernels.fatbin bytes) of an artifact directory, when it has both."""
    source, binary = Path(directory) / KERNELS_SOURCE, Path(directory) / KERNELS_BINARY
    if not (source.is_file() and binary.is_file()):
        return None
    return source.read_text(), binary.read_bytes()


def register_kernels(source: str, binary: bytes) -> None:
    """Serve ``binary`` whenever TVM asks to compile exactly ``source``."""
    _KERNELS[source_key(source)] = binary


def compile_kernels(source: str, *_target) -> bytes:
    """``tvm_callback_cuda_compile``: the fatbin compiled from ``source`` at ``edgec compile``
    time (registered here, or uploaded to this RPC server), else compiled on this machine."""
    key = source_key(source)
    if key in _KERNELS:
        log.info("CUDA kernels: the artifact's kernels.fatbin (%d bytes)", len(_KERNELS[key]))
        return _KERNELS[key]
    uploaded = _uploaded_kernels(key)
    if uploaded is not None:
        log.info("CUDA kernels: the uploaded kernels.fatbin (%d bytes)", len(uploaded))
        return uploaded
    return _compile_here(source)


def install_compile_callback() -> None:
    import tvm

    tvm.register_global_func("tvm_callback_cuda_compile", compile_kernels, override=True)


def _uploaded_kernels(key: str) -> bytes | None:
    import tvm

    workpath = tvm.get_global_func("tvm.rpc.server.workpath", allow_missing=True)
    if workpath is None:
        return None
    path = Path(str(workpath(f"{RPC_KERNELS_PREFIX}{key}.fatbin")))
    return path.read_bytes() if path.is_file() else None


def _compile_here(source: str) -> bytes:
    """TVM's own compilers, for the GPU of this machine (its arch comes from the device)."""
    from tvm.support import nvcc

    if shutil.which("nvcc"):
        log.info("CUDA kernels: compiling the source with nvcc")
        return bytes(nvcc.compile_cuda(source, target_format="fatbin", compiler="nvcc"))
    try:
        import cuda.bindings.nvrtc  # noqa: F401 - NVRTC through NVIDIA's cuda-bindings
    except ImportError:
        raise RuntimeError(
            "the artifact has no kernels.fatbin for its CUDA source and this machine can compile none: "
            "recompile the artifact where nvcc is installed, or install nvcc (CUDA toolkit) or NVRTC "
            "(pip install cuda-bindings nvidia-cuda-nvrtc) here"
        ) from None
    log.info("CUDA kernels: compiling the source with NVRTC")
    return bytes(nvcc.compile_cuda(source, target_format="cubin", compiler="nvrtc"))


def load_module(artifact):
    """Load a CUDA artifact's ``lib.so`` for GPU 0 here: (tvm.cuda(0), module)."""
    import tvm

    found = gpu()
    target = artifact.manifest["target"]
    check_arch(target["tvm"]["arch"], found.as_dict(), f"artifact '{artifact.path}'")
    kernels = artifact_kernels(artifact.path)
    if kernels is not None:
        register_kernels(*kernels)
    return tvm.cuda(0), tvm.runtime.load_module(str(artifact.lib))
