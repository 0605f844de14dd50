"""Cross-build ``edgec-agent``, the native TVM RPC server for boards without Python.

The agent is TVM's own runtime, compiled from the C++ sources the pinned
wheels ship (``tvm/src/runtime``, ``tvm_ffi/src``, their headers), plus the
support headers the wheels leave out (written for edgec, ``agent/include``)
and a small main (``agent/src/agent.cc``). One flat list of stages:

    snapshot  read every source and header once (keys come from these bytes)
    stage     write TVM's runtime sources next to agent/include/src/support,
              so their ``#include "../support/x.h"`` resolve without edits
    compile   one object per source, ``jobs`` at a time, each cached under a
              hash of (compiler, flags, every header, that source); objects of
              an earlier build of the same arch are reused
    link      -static-libstdc++ -static-libgcc, glibc left dynamic (lib.so is
              dlopen'ed), TVM's C API exported to lib.so, stripped

Result: ``~/.cache/edgec/agent/<cpu_arch>-<hash>/edgec-agent``, the hash
covering sources, headers, flags and compiler version; a single file to copy
to the board. Presets map to compilers by data: cortex-a7 -> armv7
(arm-linux-gnueabihf-g++), cortex-a53/a72 -> aarch64 (aarch64-linux-gnu-g++),
x86 -> this machine's g++.

``build_counter_plugin`` builds the other half of an emulated board: edgec's
instruction-counting QEMU plugin (``agent/plugin/icount.c``), a shared library
for this machine's qemu, made with the host's C compiler and cached the same
way under ``~/.cache/edgec/agent/plugin-<hash>/``.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import importlib.metadata
import importlib.util
import json
import logging
import os
import shutil
import subprocess
import time
from pathlib import Path

from edgec.core.errors import AgentBuildError, TargetError, ToolchainError
from edgec.core.progress import Progress
from edgec.targets.presets import PRESETS, TargetPreset

log = logging.getLogger(__name__)

AGENT_DIR = Path(__file__).resolve().parent.parent / "agent"
BINARY_NAME = "edgec-agent"
# Bump when this driver changes how objects or the binary are made.
DRIVER_REVISION = "2"

# The runtime subset that serves RPC and runs a Relax VM on a CPU (measured to be enough).
FFI_SOURCES = (
    "backtrace.cc container.cc custom_allocator.cc dtype.cc error.cc function.cc init_once.cc "
    "object.cc tensor.cc "
    "extra/dataclass.cc extra/env_c_api.cc extra/env_context.cc extra/json_parser.cc "
    "extra/json_writer.cc extra/library_module.cc extra/library_module_dynamic_lib.cc "
    "extra/library_module_system_lib.cc extra/module.cc extra/reflection_extra.cc "
    "extra/serialization.cc extra/structural_equal.cc extra/structural_hash.cc "
    "extra/structural_mutate.cc extra/structural_visit.cc extra/visit_error_context.cc"
).split()
RUNTIME_SOURCES = (
    "builtin_fp16.cc const_loader_module.cc cpu_device_api.cc device_api.cc file_utils.cc "
    "logging.cc module.cc tensor.cc thread_pool.cc threading_backend.cc timer.cc "
    "workspace_pool.cc memory/memory_manager.cc "
    "vm/builtin.cc vm/bytecode.cc vm/executable.cc vm/vm.cc "
    "rpc/rpc_channel.cc rpc/rpc_device_api.cc rpc/rpc_endpoint.cc rpc/rpc_event_impl.cc "
    "rpc/rpc_local_session.cc rpc/rpc_module.cc rpc/rpc_pipe_impl.cc rpc/rpc_server_env.cc "
    "rpc/rpc_session.cc rpc/rpc_socket_impl.cc"
).split()

COMMON_FLAGS = (
    "-std=c++17", "-O2", "-pthread", "-ffunction-sections", "-fdata-sections", "-DNDEBUG",
    "-DTVM_FFI_USE_LIBBACKTRACE=0", "-DTVM_FFI_BACKTRACE_ON_SEGFAULT=0",
)  # fmt: skip
ARCH_FLAGS = {
    "armv7": ("-march=armv7-a", "-mfpu=neon-vfpv4", "-mfloat-abi=hard"),
    "aarch64": ("-march=armv8-a",),
    "x86_64": (),
}
# lib.so calls back into the runtime through TVM's C API (TVMFFI*, TVMBackend*) and,
# for float16, the conversion helpers: the executable must export them.
EXPORTED = ("TVM*", "__gnu_f2h_ieee", "__gnu_h2f_ieee", "__truncdfhf2")
LINK_FLAGS = (
    "-static-libstdc++", "-static-libgcc", "-pthread", "-Wl,--gc-sections", "-s",
    *(f"-Wl,--export-dynamic-symbol={symbol}" for symbol in EXPORTED), "-ldl",
)  # fmt: skip
HEADER_SUFFIXES = (".h", ".hpp")
# Headers beside agent.cc that only agent.cc includes: part of its own key, not of every object's.
AGENT_LOCAL_HEADERS = ("icount.h",)

PLUGIN_NAME = "libedgec-icount.so"
PLUGIN_SOURCES = ("plugin/icount.c", "plugin/qemu_plugin_api.h", "src/icount.h")  # under agent/
PLUGIN_FLAGS = ("-std=c11", "-O2", "-Wall", "-Wextra", "-Werror", "-shared", "-fPIC", "-fvisibility=hidden")


@dataclasses.dataclass(frozen=True)
class SourceTree:
    """Where the wheels' sources are."""

    tvm: Path  # site-packages/tvm
    ffi: Path  # site-packages/tvm_ffi

    @classmethod
    def find(cls) -> SourceTree:
        roots = {}
        for name in ("tvm", "tvm_ffi"):
            spec = importlib.util.find_spec(name)
            if spec is None or spec.origin is None:
                raise AgentBuildError(f"the Python package '{name}' is not installed; install edgec's pinned wheels first")
            roots[name] = Path(spec.origin).parent
        tree = cls(roots["tvm"], roots["tvm_ffi"])
        missing = [str(tree.runtime / s) for s in RUNTIME_SOURCES if not (tree.runtime / s).is_file()]
        missing += [str(tree.ffi / "src" / "ffi" / s) for s in FFI_SOURCES if not (tree.ffi / "src" / "ffi" / s).is_file()]
        if missing:
            raise AgentBuildError(
                f"the installed TVM wheels lack runtime sources the agent needs ({', '.join(missing[:3])}"
                f"{' ...' if len(missing) > 3 else ''}); reinstall the pinned apache-tvm / apache-tvm-ffi"
            )
        return tree

    @property
    def runtime(self) -> Path:
        return self.tvm / "src" / "runtime"

    def include_dirs(self) -> list[Path]:
        """Header directories used where they are installed (wheel headers never change under us)."""
        return [self.tvm / "include", self.ffi / "include", self.ffi / "3rdparty" / "dlpack" / "include"]


@dataclasses.dataclass
class Snapshot:
    """Every file the build reads that may change, read once, laid out as the compiler sees it.

    ``files`` maps a path under the staging directory to its bytes:
    ``include/...`` (agent/include), ``src/support/*.h`` (beside TVM's runtime,
    whose ``#include "../support/x.h"`` must resolve), ``src/runtime/...`` (TVM's
    runtime sources and headers) and ``agent/agent.cc``. ``sources`` lists the
    translation units: staging paths, or absolute paths of tvm_ffi sources that
    compile in place. Keys are computed from these bytes, so editing a file
    during a build cannot put new code under an old key.
    """

    files: dict[str, bytes]
    sources: list[str]
    header_digest: str

    @classmethod
    def take(cls, tree: SourceTree) -> Snapshot:
        files: dict[str, bytes] = {}
        include = AGENT_DIR / "include"
        for path in sorted(include.rglob("*.h")):
            files[f"include/{path.relative_to(include)}"] = path.read_bytes()
        for path in sorted((include / "src" / "support").glob("*.h")):
            files[f"src/support/{path.name}"] = path.read_bytes()
        for path in sorted(tree.runtime.rglob("*.h")):
            files[f"src/runtime/{path.relative_to(tree.runtime)}"] = path.read_bytes()
        for name in RUNTIME_SOURCES:
            files[f"src/runtime/{name}"] = (tree.runtime / name).read_bytes()
        files["agent/agent.cc"] = (AGENT_DIR / "src" / "agent.cc").read_bytes()
        for name in AGENT_LOCAL_HEADERS:
            files[f"agent/{name}"] = (AGENT_DIR / "src" / name).read_bytes()
        digest = hashlib.sha256()
        for name, data in sorted(files.items()):
            if name.endswith(HEADER_SUFFIXES) and not name.startswith("agent/"):
                digest.update(name.encode() + b"\0" + data)
        # Named relative to site-packages: every checkout's virtualenv with the same wheels shares objects.
        site = tree.tvm.parent
        for directory in [*tree.include_dirs(), tree.ffi / "src"]:
            for path in sorted(p for p in directory.rglob("*") if p.suffix in HEADER_SUFFIXES):
                name = path.relative_to(site) if path.is_relative_to(site) else path
                digest.update(str(name).encode() + b"\0" + path.read_bytes())
        sources = [str(tree.ffi / "src" / "ffi" / s) for s in FFI_SOURCES]
        sources += [f"src/runtime/{name}" for name in RUNTIME_SOURCES] + ["agent/agent.cc"]
        return cls(files, sources, digest.hexdigest())

    def content(self, source: str) -> bytes:
        return self.files[source] if source in self.files else Path(source).read_bytes()

    def key_content(self, source: str) -> bytes:
        """What decides ``source``'s object: its bytes, and for agent.cc also the headers beside it."""
        if source.startswith("agent/"):
            return b"\0".join([self.content(source), *(self.files[f"agent/{name}"] for name in AGENT_LOCAL_HEADERS)])
        return self.content(source)

    def write(self, stage: Path) -> None:
        for name, data in self.files.items():
            target = stage / name
            target.parent.mkdir(parents=True, exist_ok=True)
            if not target.is_file() or target.read_bytes() != data:
                _write_atomic(target, data)  # another build may be compiling from the same stage


@dataclasses.dataclass(frozen=True)
class Toolset:
    """The compiler for one CPU architecture and the flags it gets (include paths apart)."""

    cpu_arch: str
    compiler: str
    identity: str  # `--version` first line + target triple: part of every cache key
    cflags: tuple[str, ...]
    ldflags: tuple[str, ...]


def build_agent(target_preset_name: str, output: Path | None = None, progress: Progress | None = None, jobs: int = 2) -> Path:
    """Build (or reuse from the cache) the agent for a preset's CPU; return the binary's path.

    ``output``: also copy the binary there (a file path, or a directory to put
    ``edgec-agent`` in). ``jobs``: compilers run at once.
    """
    progress = progress or Progress()
    preset = _preset(target_preset_name)
    tree = SourceTree.find()
    tools = _toolset(preset)
    snapshot = Snapshot.take(tree)
    contents = [_sha(snapshot.key_content(source)) for source in snapshot.sources]
    full_key = _hash(tools.identity, *tools.cflags, *tools.ldflags, snapshot.header_digest, *contents)[:16]
    build_dir = cache_root() / f"{tools.cpu_arch}-{full_key}"
    binary = build_dir / BINARY_NAME
    if binary.is_file():
        log.info("edgec-agent for %s from the cache: %s", tools.cpu_arch, binary)
    else:
        with progress.stage("agent", f"{tools.cpu_arch}: {len(snapshot.sources)} files, {jobs} jobs"):
            _build(tools, tree, snapshot, build_dir, binary, jobs)
    if output is None:
        return binary
    output = Path(output)
    target = output / BINARY_NAME if output.is_dir() else output
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(binary, target)
    return target


def build_counter_plugin() -> Path:
    """Build (or reuse from the cache) the instruction-counting QEMU plugin; return the library's path.

    A QEMU TCG plugin is loaded into this machine's qemu-user (``-plugin``), so it
    is built by the host's C compiler; it links against nothing (qemu exports the
    plugin API) and takes well under a second to compile.
    """
    compiler = shutil.which("gcc") or shutil.which("cc")
    if compiler is None:
        raise ToolchainError("building the instruction-counting qemu plugin needs a C compiler; install it with: sudo apt-get install gcc")
    sources = {name: (AGENT_DIR / name).read_bytes() for name in PLUGIN_SOURCES}
    identity = _run([compiler, "--version"]).splitlines()[0]
    key = _hash(identity, *PLUGIN_FLAGS, DRIVER_REVISION, *(f"{name}\0{_sha(data)}" for name, data in sources.items()))[:16]
    build_dir = cache_root() / f"plugin-{key}"
    library = build_dir / PLUGIN_NAME
    if library.is_file():
        return library
    stage = build_dir / "src"
    for name, data in sources.items():
        (stage / name).parent.mkdir(parents=True, exist_ok=True)
        _write_atomic(stage / name, data)
    temporary = library.with_suffix(f".{os.getpid()}.tmp")
    command = [compiler, *PLUGIN_FLAGS, f"-I{stage / 'src'}", str(stage / "plugin" / "icount.c"), "-o", str(temporary)]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        temporary.unlink(missing_ok=True)
        raise AgentBuildError(f"compiling the instruction-counting qemu plugin failed:\n{_first_errors(done.stderr)}")
    temporary.replace(library)
    log.info("built %s", library)
    return library


def cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "edgec" / "agent"


def _preset(name: str) -> TargetPreset:
    preset = PRESETS.get(name)
    if preset is None:
        raise TargetError(f"unknown target preset {name!r}; known: {', '.join(sorted(PRESETS))}")
    if preset.kind != "llvm":
        raise TargetError(f"target {name!r} is a {preset.kind} target; the agent runs CPU code only (x86, cortex-a*)")
    return preset


def _toolset(preset: TargetPreset) -> Toolset:
    compiler, package = (preset.toolchain.compiler, preset.toolchain.debian_package) if preset.toolchain else ("g++", "g++")
    path = shutil.which(compiler)
    if path is None:
        raise ToolchainError(f"building the agent for {preset.name!r} needs {compiler!r}; install it with: sudo apt-get install {package}")
    version = _run([path, "--version"]).splitlines()[0]
    machine = _run([path, "-dumpmachine"]).strip()
    tvm_version = importlib.metadata.version("apache-tvm")
    cflags = (*COMMON_FLAGS, *ARCH_FLAGS[preset.cpu_arch], f'-DEDGEC_TVM_VERSION="{tvm_version}"')
    ldflags = (*ARCH_FLAGS[preset.cpu_arch], *LINK_FLAGS)
    return Toolset(preset.cpu_arch, path, f"{version} {machine} driver {DRIVER_REVISION}", cflags, ldflags)


def _build(tools: Toolset, tree: SourceTree, snapshot: Snapshot, build_dir: Path, binary: Path, jobs: int) -> None:
    start = time.perf_counter()
    stage = build_dir / "src"
    objects_dir = build_dir / "obj"
    objects_dir.mkdir(parents=True, exist_ok=True)
    snapshot.write(stage)
    includes = (
        f"-I{stage / 'include'}",
        f"-I{stage / 'include' / 'compiler-rt'}",  # <builtin_fp16.h>
        *(f"-I{d}" for d in tree.include_dirs()),
    )
    plan = []  # (file the compiler reads, object path)
    for source in snapshot.sources:
        stem = _object_stem(source, tree)
        key = _hash(tools.identity, *tools.cflags, snapshot.header_digest, _sha(snapshot.key_content(source)), stem)[:16]
        plan.append((Path(source) if Path(source).is_absolute() else stage / source, objects_dir / f"{stem}-{key}.o"))
    todo = [(src, obj) for src, obj in plan if not obj.is_file() and not _reuse(obj, tools.cpu_arch)]
    log.info("agent %s: %d of %d objects to compile", tools.cpu_arch, len(todo), len(plan))
    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        futures = [pool.submit(_compile, tools, includes, src, obj) for src, obj in todo]
        try:
            for future in concurrent.futures.as_completed(futures):
                future.result()
        except BaseException:
            pool.shutdown(wait=True, cancel_futures=True)
            raise
    temporary = binary.with_suffix(f".{os.getpid()}.tmp")
    link = [tools.compiler, *(str(obj) for _, obj in plan), "-o", str(temporary), *tools.ldflags]
    done = subprocess.run(link, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise AgentBuildError(f"linking {BINARY_NAME} for {tools.cpu_arch} failed:\n{_first_errors(done.stderr)}")
    temporary.replace(binary)
    info = {
        "cpu_arch": tools.cpu_arch, "compiler": tools.identity, "cflags": list(tools.cflags),
        "ldflags": list(tools.ldflags), "sources": len(plan), "compiled": len(todo),
        "seconds": round(time.perf_counter() - start, 1), "bytes": binary.stat().st_size,
    }  # fmt: skip
    (build_dir / "build.json").write_text(json.dumps(info, indent=2) + "\n")
    log.info("built %s (%d bytes) in %.0f s", binary, info["bytes"], info["seconds"])


def _object_stem(source: str, tree: SourceTree) -> str:
    """``runtime_rpc_rpc_endpoint``, ``ffi_extra_module``, ``agent_agent``: unique per source."""
    if source.startswith("src/runtime/"):
        return "runtime_" + source.removeprefix("src/runtime/").removesuffix(".cc").replace("/", "_")
    if source.startswith("agent/"):
        return "agent_" + source.removeprefix("agent/").removesuffix(".cc").replace("/", "_")
    relative = Path(source).relative_to(tree.ffi / "src" / "ffi").with_suffix("")
    return "_".join(("ffi", *relative.parts))


def _reuse(obj: Path, cpu_arch: str) -> bool:
    """Hard-link (or copy) the same object from another build of this arch (same name = same inputs)."""
    for other in obj.parent.parent.parent.glob(f"{cpu_arch}-*/obj/{obj.name}"):
        if other != obj:
            try:
                os.link(other, obj)
            except OSError:
                shutil.copy2(other, obj)
            return True
    return False


def _compile(tools: Toolset, includes: tuple[str, ...], source: Path, obj: Path) -> None:
    temporary = obj.with_suffix(f".{os.getpid()}.tmp")
    command = [tools.compiler, *tools.cflags, *includes, "-c", str(source), "-o", str(temporary)]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        temporary.unlink(missing_ok=True)
        raise AgentBuildError(f"compiling {source.name} for {tools.cpu_arch} failed ({source}):\n{_first_errors(done.stderr)}")
    temporary.replace(obj)


def _first_errors(stderr: str, limit: int = 12) -> str:
    lines = stderr.strip().splitlines()
    errors = [i for i, line in enumerate(lines) if "error" in line.lower()]
    start = max(0, errors[0] - 2) if errors else 0
    return "\n".join(lines[start : start + limit]) or "(no compiler output)"


def _write_atomic(path: Path, data: bytes) -> None:
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    temporary.write_bytes(data)
    temporary.replace(path)


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _hash(*parts: str) -> str:
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()


def _run(command: list[str]) -> str:
    return subprocess.run(command, capture_output=True, text=True, check=True).stdout
