"""CUDA artifacts: everything up to the GPU call runs here; tests marked ``gpu`` run the rest.

Without a GPU (this machine): the loading of TVM's CUDA runtime piece by piece, with a
fake dlopen and a fake driver; its one-line errors; the float16 build and its numerics
(the same Relax graph built for this CPU); host code for a generic x86-64; and, in a
subprocess with stand-in libcudart/libcuda libraries that answer "no device", the real
chain: TVM's CUDA runtime loads, a CUDA artifact's lib.so loads through TVM's CUDA module
loader with edgec serving kernels.fatbin, locally and on an RPC server, and every command
ends in ``Error: no CUDA device: ...``. With a GPU (``gpu`` tests): compile + verify on
the GPU, run, bench, profile, float16, and the RPC server.
"""

from __future__ import annotations

import ctypes
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

import edgec
from backbone import disassembly, elf_header, needs_objdump
from edgec.cli import cli
from edgec.core.errors import ArtifactError, NoCudaDeviceError
from edgec.runtimes import cuda
from edgec.targets import resolve
from edgec.targets.resolve import FLOAT16_TOLERANCE

ROOT = Path(__file__).resolve().parents[2]
EM_X86_64_MACHINE = 62


# --- loading, piece by piece (fake dlopen, fake driver) ---------------------------------


class FakeOpener:
    """dlopen stand-in: loads the names in ``loads`` (returning ``handle``), refuses the rest."""

    def __init__(self, loads: dict[str, object]):
        self.loads = loads
        self.calls: list[tuple[str, int]] = []

    def __call__(self, name: str, mode: int):
        self.calls.append((name, mode))
        if name in self.loads:
            return self.loads[name]
        raise OSError(f"{name}: cannot open shared object file: No such file or directory")


def _lib_dir(root: Path, relative: str, with_cudart: bool = True) -> Path:
    directory = root / relative
    directory.mkdir(parents=True)
    if with_cudart:
        (directory / cuda.CUDART).write_bytes(b"not a real library")
    return directory


def test_cudart_search_order(tmp_path):
    wheel = _lib_dir(tmp_path / "site", "nvidia/cu13/lib")
    home = _lib_dir(tmp_path / "home", "lib64")
    path_lib = _lib_dir(tmp_path / "path", "lib")
    dirs = cuda.cudart_dirs(
        paths=["", str(tmp_path / "missing"), str(tmp_path / "site"), str(tmp_path / "site")],
        environ={"CUDA_HOME": str(tmp_path / "home"), "CUDA_PATH": str(tmp_path / "path")},
    )
    # the pip wheel first, then the toolkits named by the environment; duplicates and missing dirs dropped
    assert dirs[:3] == [wheel, home, path_lib]
    assert all(directory.is_dir() for directory in dirs)
    assert len({directory.resolve() for directory in dirs}) == len(dirs)


def test_cudart_first_loadable_candidate_wins(tmp_path):
    broken = _lib_dir(tmp_path, "broken")
    good = _lib_dir(tmp_path, "good")
    empty = _lib_dir(tmp_path, "empty", with_cudart=False)
    opener = FakeOpener({str(good / cuda.CUDART): "cudart"})
    assert cuda.load_cudart([empty, broken, good], opener) == str(good / cuda.CUDART)
    assert opener.calls == [(str(broken / cuda.CUDART), ctypes.RTLD_GLOBAL), (str(good / cuda.CUDART), ctypes.RTLD_GLOBAL)]


def test_cudart_soname_last(tmp_path):
    opener = FakeOpener({cuda.CUDART: "cudart"})
    assert cuda.load_cudart([_lib_dir(tmp_path, "a")], opener) == cuda.CUDART
    assert [name for name, _ in opener.calls] == [str(tmp_path / "a" / cuda.CUDART), cuda.CUDART]


def test_missing_cudart_says_how_to_install(tmp_path):
    directory = _lib_dir(tmp_path, "lib", with_cudart=False)
    with pytest.raises(NoCudaDeviceError) as error:
        cuda.load_cudart([directory], FakeOpener({}))
    message = str(error.value)
    assert message.startswith("no CUDA device: the CUDA 13 runtime libcudart.so.13 is not installed")
    assert str(directory) in message
    assert "pip install -e '.[cuda]'" in message and "\n" not in message


def test_missing_driver_names_libcuda():
    with pytest.raises(NoCudaDeviceError) as error:
        cuda.load_driver(FakeOpener({}))
    message = str(error.value)
    assert message.startswith("no CUDA device: the NVIDIA driver library libcuda.so.1 is not on this machine")
    assert "not from pip" in message and "\n" not in message
    assert cuda.load_driver(FakeOpener({cuda.DRIVER: "driver"})) == "driver"


class FakeDriver:
    """The few libcuda entry points edgec calls, with chosen answers (CUresult codes)."""

    def __init__(self, init: int = 0, version: int = 13000, count: int = 1):
        self.init, self.version, self.count = init, version, count

    def cuInit(self, _flags):  # noqa: N802 - the driver's names
        return self.init

    def cuDriverGetVersion(self, pointer):  # noqa: N802
        pointer._obj.value = self.version
        return 0

    def cuDeviceGetCount(self, pointer):  # noqa: N802
        pointer._obj.value = self.count
        return 0

    def cuGetErrorName(self, status, pointer):  # noqa: N802
        names = {100: b"CUDA_ERROR_NO_DEVICE", 999: b"CUDA_ERROR_UNKNOWN"}
        if status not in names:
            return 1
        pointer._obj.value = names[status]
        return 0


def test_driver_probe():
    assert cuda.probe_driver(FakeDriver(version=13020, count=2)) == (2, (13, 2))


@pytest.mark.parametrize(
    ("driver", "expected"),
    [
        (FakeDriver(init=100), "the NVIDIA driver found no usable GPU (cuInit: CUDA_ERROR_NO_DEVICE (100))"),
        (FakeDriver(init=7), "the NVIDIA driver found no usable GPU (cuInit: error 7)"),
        (FakeDriver(version=12080), "runs CUDA up to 12.8, but TVM's CUDA runtime is built for CUDA 13"),
        (FakeDriver(count=0), "the NVIDIA driver sees no GPU (cuDeviceGetCount: 0 devices)"),
    ],
)
def test_driver_probe_errors(driver, expected):
    with pytest.raises(NoCudaDeviceError) as error:
        cuda.probe_driver(driver)
    assert str(error.value).startswith("no CUDA device: ")
    assert expected in str(error.value)


@pytest.mark.parametrize(
    ("arch", "gpu_arch", "runs"),
    [
        ("sm_80", "sm_80", True),
        ("sm_80", "sm_86", True),
        ("sm_80", "sm_90", True),  # PTX, compiled by the driver for the newer GPU
        ("sm_86", "sm_80", False),
        ("sm_90", "sm_89", False),
        ("sm_90a", "sm_90", True),
        ("sm_90a", "sm_100", False),  # arch-specific code runs on its own GPU only
        ("sm_100", "sm_90", False),
    ],
)
def test_arch_compatibility(arch, gpu_arch, runs):
    gpu = {"name": "Test GPU", "arch": gpu_arch}
    if runs:
        cuda.check_arch(arch, gpu, "artifact 'a'")
        return
    with pytest.raises(ArtifactError) as error:
        cuda.check_arch(arch, gpu, "artifact 'a'")
    assert f"compiled for {arch}" in str(error.value) and f"-t cuda:arch={gpu_arch}" in str(error.value)


def test_compute_capability():
    assert cuda.compute_capability("sm_86") == (8, 6)
    assert cuda.compute_capability("sm_90a") == (9, 0)
    assert cuda.compute_capability("sm_100") == (10, 0)
    with pytest.raises(ArtifactError):
        cuda.compute_capability("compute_80")


def test_kernel_compiler_serves_the_registered_fatbin(monkeypatch):
    source = "extern \"C\" __global__ void edgec_test_kernel() {}\n"
    cuda.register_kernels(source, b"FATBIN-BYTES")
    assert cuda.compile_kernels(source) == b"FATBIN-BYTES"
    # another source, and no compiler on this machine: one clear error, no silent fallback
    monkeypatch.setattr(shutil, "which", lambda _name: None)
    monkeypatch.setitem(sys.modules, "cuda", None)  # no cuda-bindings (NVRTC)
    with pytest.raises(RuntimeError, match="no kernels.fatbin for its CUDA source"):
        cuda.compile_kernels(source + "// changed\n")


# --- targets and builds ------------------------------------------------------------------


def test_cuda_host_is_generic_x86_64():
    resolved = resolve("cuda")
    assert resolved.host_json == {"kind": "llvm", "mcpu": "x86-64"}
    assert str(resolved.tvm_target().host.attrs["mcpu"]) == "x86-64"
    assert resolved.dtype == "float32" and resolved.min_tolerance == 0.0


def test_float16_option():
    resolved = resolve("cuda:dtype=float16,arch=sm_86")
    assert resolved.options == {"arch": "sm_86", "dtype": "float16"}
    assert resolved.spec == "cuda:arch=sm_86,dtype=float16"
    assert resolved.tvm_json == {"kind": "cuda", "arch": "sm_86"}
    assert resolved.min_tolerance == FLOAT16_TOLERANCE
    with pytest.raises(edgec.core.errors.TargetError, match="float32, float16"):
        resolve("cuda:dtype=int8")


@pytest.fixture(scope="module")
def cuda_result(artifacts):
    return artifacts.get("resnet", "cuda")


@pytest.fixture(scope="module")
def fp16_result(artifacts):
    return artifacts.get("resnet", "cuda:dtype=float16")


def _has_avx(lib: Path) -> int:
    return sum(1 for line in disassembly(lib).splitlines() if "%ymm" in line or "%zmm" in line)


@needs_objdump
def test_cuda_host_code_has_no_avx(cuda_result, artifacts):
    # generic x86-64: no AVX registers in the host code, which an x86 build for this CPU uses
    assert elf_header(cuda_result.artifact.lib)["machine"] == EM_X86_64_MACHINE
    assert _has_avx(cuda_result.artifact.lib) == 0
    assert _has_avx(artifacts.get("resnet", "x86").artifact.lib) > 0


def test_cuda_manifest_without_gpu(cuda_result):
    manifest = cuda_result.manifest
    target = manifest["target"]
    assert (target["dtype"], target["min_tolerance"]) == ("float32", 0.0)
    assert target["host"] == {"kind": "llvm", "mcpu": "x86-64"}
    if cuda.unavailable_reason("sm_80") is not None:  # this machine: no GPU
        verification = manifest["verification"]
        assert verification["status"] == "skipped"
        assert verification["reason"].startswith("no CUDA device: ")
        assert "check it on a GPU with edgec bench" in verification["reason"]


def test_float16_build(fp16_result, cuda_result):
    manifest = fp16_result.manifest
    assert manifest["target"]["spec"] == "cuda:arch=sm_80,dtype=float16"
    assert (manifest["target"]["dtype"], manifest["target"]["min_tolerance"]) == ("float16", FLOAT16_TOLERANCE)
    half = (fp16_result.artifact.path / "kernels.cu").read_text()
    full = (cuda_result.artifact.path / "kernels.cu").read_text()
    # float16 loads in the kernels' bodies (the shared header mentions half in both)
    assert half.count("half*") > full.count("half*")
    assert [spec["dtype"] for spec in manifest["inputs"] + manifest["outputs"]] == ["float32", "float32"]
    if shutil.which("nvcc"):
        assert "kernels.fatbin" in manifest["files"]
        assert (fp16_result.artifact.path / "kernels.fatbin").stat().st_size > 0


def test_float16_graph_numerics_on_this_cpu(saved_models):
    """The float16 graph of a CUDA build, built for this CPU instead: lossy (so float16 is
    really used), within the tolerance that float16 builds are checked with."""
    import tvm
    from tvm import relax

    from edgec.build import float16_passes
    from edgec.lower import to_relax
    from edgec.runtimes.reference import run_onnxruntime

    saved = saved_models["resnet"]
    model = edgec.load(saved.files["torchscript"], **saved.load_kwargs("torchscript"))
    mod = tvm.transform.Sequential(float16_passes())(to_relax(model.graph, resolve("cuda:dtype=float16")))
    assert "float16" in mod.script()
    vm = relax.VirtualMachine(relax.build(mod, target="llvm"), tvm.cpu())
    x = np.random.default_rng(0).standard_normal(saved.shape).astype(np.float32)
    got = vm["main"](tvm.runtime.tensor(x)).numpy()
    (want,) = run_onnxruntime(model.graph, [x])
    assert got.dtype == np.float32
    error = np.abs(got - want)
    assert error.max() > 1e-6  # float16 rounding is there
    np.testing.assert_allclose(got, want, rtol=FLOAT16_TOLERANCE, atol=FLOAT16_TOLERANCE)


# --- without a GPU: one line --------------------------------------------------------------


@pytest.mark.parametrize("command", [["run", "--random"], ["bench", "--local"], ["profile", "--local"]])
def test_commands_say_no_cuda_device(cuda_result, command):
    if cuda.unavailable_reason("sm_80") is None:
        pytest.skip("this machine has a GPU")
    result = CliRunner().invoke(cli, [command[0], str(cuda_result.artifact.path), *command[1:]])
    assert result.exit_code == 1
    errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and errors[0].startswith("Error: no CUDA device: ")


def test_agent_without_cuda_is_refused(cuda_result):
    from edgec.runtimes.session import RemoteDevice

    class Session:
        def get_function(self, name):
            raise RuntimeError(f"function {name} not found")

    device = RemoteDevice.__new__(RemoteDevice)  # a connected agent, without the RPC
    device.session, device.label, device.info = Session(), "device at board:9090", {"cpu_arch": "x86_64"}
    with pytest.raises(NoCudaDeviceError, match="device at board:9090 runs no CUDA"):
        device.check_artifact(cuda_result.artifact)


# --- the real chain, with stand-in CUDA libraries (subprocess) ----------------------------

STUB_NO_DEVICE = 100  # cudaErrorNoDevice and CUDA_ERROR_NO_DEVICE


def _undefined_symbols(library: Path) -> list[str]:
    listing = subprocess.run(["nm", "-D", "--undefined-only", str(library)], capture_output=True, text=True, check=True).stdout
    return sorted({line.split()[-1].split("@")[0] for line in listing.splitlines() if line.strip()})


def build_stub_cuda(directory: Path) -> Path:
    """libcudart.so.13 and libcuda.so.1 stand-ins with every function TVM's CUDA runtime
    links (found with nm), each answering "no device"; the error-name functions answer
    with a string. Versioned like the real libcudart (TVM links cudart@libcudart.so.13)."""
    import tvm

    symbols = _undefined_symbols(Path(tvm.__file__).parent / "lib" / cuda.TVM_CUDA_RUNTIME)
    runtime = [name for name in symbols if name.startswith("cuda")]
    driver = sorted({name for name in symbols if name.startswith("cu") and not name.startswith("cuda")}
                    | {"cuInit", "cuDriverGetVersion", "cuDeviceGetCount", "cuGetErrorName", "cuGetErrorString"})
    strings = {"cudaGetErrorString", "cudaGetErrorName"}
    out_strings = {"cuGetErrorName", "cuGetErrorString"}
    cudart_c = "\n".join(
        f'const char* {name}(int e) {{ return "cudaErrorNoDevice (edgec test stub)"; }}' if name in strings
        else f"int {name}(void) {{ return {STUB_NO_DEVICE}; }}"
        for name in runtime
    )
    driver_c = "\n".join(
        f'int {name}(int e, const char** out) {{ *out = "CUDA_ERROR_NO_DEVICE"; return 0; }}' if name in out_strings
        else f"int {name}(void) {{ return {STUB_NO_DEVICE}; }}"
        for name in driver
    )
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "cudart.c").write_text(cudart_c + "\n")
    (directory / "driver.c").write_text(driver_c + "\n")
    (directory / "cudart.map").write_text("libcudart.so.13 { global: *; };\n")
    for source, soname, extra in (
        ("cudart.c", cuda.CUDART, [f"-Wl,--version-script={directory / 'cudart.map'}"]),
        ("driver.c", cuda.DRIVER, []),
    ):
        subprocess.run(
            ["gcc", "-shared", "-fPIC", "-w", "-o", str(directory / soname), f"-Wl,-soname,{soname}", *extra, str(directory / source)],
            check=True,
        )
    return directory


STUB_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import tvm
    from edgec.core.artifact import load_artifact
    from edgec.core.errors import NoCudaDeviceError
    from edgec.runtimes import cuda
    from edgec.runtimes.local import LocalRunner
    from edgec.runtimes.serve import start_server
    from edgec.runtimes.session import connect

    report = {}
    try:
        cuda.gpu()
    except NoCudaDeviceError as error:
        report["gpu_error"] = str(error)
    report["device_api"] = tvm.get_global_func("device_api.cuda", allow_missing=True) is not None
    report["exist"] = bool(tvm.cuda(0).exist)

    artifact = load_artifact(sys.argv[1])
    source, binary = cuda.artifact_kernels(artifact.path)
    asked = []

    def recording(code, *rest):
        asked.append(cuda.source_key(code))
        return cuda.compile_kernels(code, *rest)

    tvm.register_global_func("tvm_callback_cuda_compile", recording, override=True)
    cuda.register_kernels(source, binary)
    module = tvm.runtime.load_module(str(artifact.lib))  # TVM's CUDA loader; the kernels from kernels.fatbin
    kinds = []
    pending = list(module.imports)
    while pending:
        kinds.append(pending[0].kind)
        pending = pending[1:] + list(pending[0].imports)
    report["kinds"] = kinds
    report["asked"] = asked == [cuda.source_key(source)]
    try:
        LocalRunner(artifact)
    except NoCudaDeviceError as error:
        report["runner_error"] = str(error)

    server = start_server("127.0.0.1", int(sys.argv[2]))
    try:
        with connect(rpc=f"127.0.0.1:{server.port}", timeout=120) as device:
            try:
                device.check_artifact(artifact)
            except NoCudaDeviceError as error:
                report["rpc_error"] = str(error)
            remote = device.load(artifact)  # the server's CUDA loader, with the uploaded kernels.fatbin
            report["rpc_loaded"] = remote is not None
    finally:
        server.terminate()
    print("REPORT " + json.dumps(report))
    """
)


@pytest.mark.skipif(shutil.which("gcc") is None or shutil.which("nm") is None, reason="needs gcc and nm")
def test_cuda_chain_with_stub_libraries(cuda_result, tmp_path):
    """TVM's CUDA runtime loaded for real against stand-in libraries: the artifact's lib.so
    loads through TVM's CUDA module loader here and on an RPC server, with its CUDA source
    answered by kernels.fatbin (no nvcc and no NVRTC on PATH, so nothing else could), and
    every GPU use ends in the driver's "no device"."""
    import socket

    if not (cuda_result.artifact.path / cuda.KERNELS_BINARY).is_file():
        pytest.skip("the artifact has no kernels.fatbin (no nvcc when it was compiled)")
    stubs = build_stub_cuda(tmp_path / "stubs")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {
        **os.environ,
        "LD_LIBRARY_PATH": str(stubs),
        "PATH": os.pathsep.join(p for p in ("/usr/bin", "/bin") if Path(p).is_dir()),  # no nvcc
        "CUDA_HOME": str(tmp_path / "no-toolkit"),
    }
    script = tmp_path / "chain.py"
    script.write_text(STUB_SCRIPT)
    done = subprocess.run(
        [sys.executable, str(script), str(cuda_result.artifact.path), str(port)],
        capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path, check=False,
    )
    lines = [line for line in done.stdout.splitlines() if line.startswith("REPORT ")]
    assert done.returncode == 0 and lines, done.stderr[-3000:]
    report = json.loads(lines[-1].removeprefix("REPORT "))
    no_gpu = "no CUDA device: the NVIDIA driver found no usable GPU (cuInit: CUDA_ERROR_NO_DEVICE (100))"
    assert report["gpu_error"].startswith(no_gpu)
    assert report["device_api"] is True and report["exist"] is False
    assert "cuda" in report["kinds"]
    assert report["asked"] is True  # TVM asked edgec for exactly kernels.cu, once
    assert report["runner_error"].startswith(no_gpu)
    assert report["rpc_error"].startswith(f"no CUDA device: device at 127.0.0.1:{port}: the NVIDIA driver found no usable GPU")
    assert report["rpc_loaded"] is True


# --- on a GPU -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def gpu_arch():
    try:
        return cuda.gpu().arch
    except NoCudaDeviceError as error:
        pytest.fail(f"nvidia-smi sees a GPU but edgec cannot use it: {error}")


@pytest.fixture(scope="module")
def gpu_results(saved_models, gpu_arch, tmp_path_factory):
    """The ResNet compiled for this GPU, float32 and float16, verified on it."""
    saved = saved_models["resnet"]
    model = edgec.load(saved.files["torchscript"], **saved.load_kwargs("torchscript"))
    root = tmp_path_factory.mktemp("gpu")
    return {
        dtype: edgec.compile(model, f"cuda:arch={gpu_arch},dtype={dtype}", root / f"resnet_{dtype}")
        for dtype in ("float32", "float16")
    }


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_gpu_compile_verifies_on_the_gpu(gpu_results, dtype):
    verification = gpu_results[dtype].manifest["verification"]
    assert verification["status"] == "passed", verification
    floor = FLOAT16_TOLERANCE if dtype == "float16" else 1e-4
    assert verification["rtol"] == verification["atol"] == floor
    assert verification["onnxruntime"]["within_tolerance"] and verification["pytorch"]["within_tolerance"]


@pytest.mark.gpu
def test_gpu_run_equals_pytorch(gpu_results, saved_models):
    from edgec.runtimes.local import LocalRunner

    runner = LocalRunner(gpu_results["float32"].artifact)
    assert runner.device.dlpack_device_type() == 2  # kDLCUDA
    saved = saved_models["resnet"]
    for seed in (0, 1):
        x = np.random.default_rng(seed).standard_normal(saved.shape).astype(np.float32)
        (got,) = runner.run([x])
        np.testing.assert_allclose(got, saved.torch_outputs(x), rtol=1e-4, atol=1e-4)
    assert min(runner.time_ms([x], repeat=3)) > 0


@pytest.mark.gpu
def test_gpu_bench_and_profile(gpu_results, tmp_path):
    from backbone import assert_profile_adds_up

    path = str(gpu_results["float32"].artifact.path)
    runner = CliRunner()
    bench = runner.invoke(cli, ["bench", path, "--local", "--repeat", "5", "--json"])
    assert bench.exit_code == 0, bench.output
    data = json.loads(bench.stdout)
    assert data["check"]["ok"] is True and data["device_info"]["gpu"]["arch"]
    assert len(data["times_ms"]) == 5 and min(data["times_ms"]) > 0
    profile = runner.invoke(cli, ["profile", path, "--local", "--repeat", "3", "--json"])
    assert profile.exit_code == 0, profile.output
    assert_profile_adds_up(json.loads(profile.stdout), gpu_results["float32"].manifest)
    # float16: bench checks its outputs with the float16 tolerance
    bench16 = runner.invoke(cli, ["bench", str(gpu_results["float16"].artifact.path), "--local", "--repeat", "3", "--json"])
    assert bench16.exit_code == 0, bench16.output
    assert json.loads(bench16.stdout)["check"]["rtol"] == FLOAT16_TOLERANCE


@pytest.mark.gpu
def test_gpu_over_rpc(gpu_results):
    import socket

    from edgec.runtimes.bench import bench
    from edgec.core.inputs import random_inputs
    from edgec.runtimes.serve import start_server
    from edgec.runtimes.session import connect

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = start_server("127.0.0.1", port)
    try:
        artifact = gpu_results["float32"].artifact
        with connect(rpc=f"127.0.0.1:{server.port}", timeout=120) as device:
            result = bench(artifact, device, random_inputs(artifact.inputs), repeat=3, warmup=1)
        assert result.check["ok"] is True and result.device_info["gpu"]["arch"]
    finally:
        server.terminate()
