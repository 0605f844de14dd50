"""The ``edgec`` command line: parse, call the library, print.

Heavy libraries (torch, tvm, onnx) are imported inside command bodies so
that ``edgec --help`` is instant. Every EdgecError ends as ``Error: ...`` on
stderr and exit status 1; progress goes to stderr, results to stdout.
"""

from __future__ import annotations

import json
import logging
import sys
import warnings
from pathlib import Path

import click

from edgec import __version__
from edgec.core.errors import EdgecError

log = logging.getLogger("edgec")

MODEL_FORMATS = "TorchScript (.pt), torch.export (.pt2), ONNX (.onnx), or a pickled nn.Module with --trust-pickle"


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread like Ctrl-C's KeyboardInterrupt, so that everything
    that cleans up after Ctrl-C (the staging directory, TVM's temporary directories, an
    emulated board) does so after ``kill`` too."""


def _terminate(_signum, _frame):
    raise Terminated


class EdgecGroup(click.Group):
    """Turns EdgecError into one clean line and exit status 1; SIGTERM into cleanup and status 143."""

    def invoke(self, ctx: click.Context):
        import signal
        import threading

        main_thread = threading.current_thread() is threading.main_thread()  # only it may set handlers
        previous = signal.signal(signal.SIGTERM, _terminate) if main_thread else None
        try:
            return super().invoke(ctx)
        except EdgecError as error:
            click.echo(f"Error: {error}", err=True)
            if log.isEnabledFor(logging.DEBUG):
                import traceback

                traceback.print_exc()
            ctx.exit(1)
        except Terminated:
            click.echo("Error: stopped by SIGTERM; nothing half-written was left behind", err=True)
            ctx.exit(128 + signal.SIGTERM)
        finally:
            if main_thread:
                signal.signal(signal.SIGTERM, previous)


def _setup_logging(verbosity: int) -> None:
    level = {0: logging.WARNING, 1: logging.INFO}.get(verbosity, logging.DEBUG)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr, force=True)
    if verbosity < 2:
        warnings.filterwarnings("ignore")
        for noisy in ("torch", "onnxscript", "onnx_ir", "tvm"):
            logging.getLogger(noisy).setLevel(logging.ERROR)


@click.group(cls=EdgecGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, "--version", prog_name="edgec")
@click.option("-v", "--verbose", count=True, help="-v: what each stage and pass decided; -vv: debug, with tracebacks.")
def cli(verbose: int) -> None:
    """edgec: compile compressed PyTorch CNNs for ARM Cortex-A, x86 and CUDA.

    \b
      edgec compile model.pt --input-shape 1,3,224,224 --target cortex-a7 -o build/model
      edgec run build/model_x86 --random
      edgec inspect model.pt --input-shape 1,3,224,224
      edgec targets
    """
    _setup_logging(verbose)


def _input_shape_option(function):
    return click.option(
        "--input-shape",
        "input_shapes",
        multiple=True,
        metavar="[NAME:]D0,D1,...",
        help="Static input shape, e.g. 1,3,224,224; repeat once per input. Needed for TorchScript and pickles.",
    )(function)


def _trust_pickle_option(function):
    return click.option(
        "--trust-pickle",
        is_flag=True,
        help="Allow loading a pickled nn.Module (torch.save(model)); unpickling runs code from the file.",
    )(function)


def _default_threads(_ctx, _param, threads: int | None) -> int:
    """--threads, else the user's TVM_NUM_THREADS (a positive count), else the physical cores."""
    import os

    from edgec.targets.resolve import physical_cores

    if threads is None:
        given = os.environ.get("TVM_NUM_THREADS", "").strip()
        if given and not given.isdigit():
            raise click.BadParameter(f"TVM_NUM_THREADS={given!r} is not a thread count: unset it or give a number")
        threads = int(given or 0) or physical_cores()
    return threads


def _threads_option(function):
    return click.option(
        "--threads",
        type=click.IntRange(1),
        callback=_default_threads,
        help="Threads of the compiled kernels on this machine [default: TVM_NUM_THREADS, else physical cores].",
    )(function)


def _load(model_path: Path, input_shapes, trust_pickle: bool, progress):
    from edgec.frontend import load

    with progress.stage("load", f"{model_path.name} -> ONNX IR"):
        return load(model_path, list(input_shapes) or None, trust_pickle=trust_pickle)


@cli.command()
@click.argument("model_path", metavar="MODEL", type=click.Path(path_type=Path))
@click.option("-t", "--target", "target_spec", required=True, metavar="TARGET[:k=v]", help="Target preset (see `edgec targets`), e.g. cortex-a7, x86, cuda:arch=sm_86.")
@click.option("-o", "--output", type=click.Path(path_type=Path), help="Artifact directory [default: build/<model>_<target>].")
@_input_shape_option
@_trust_pickle_option
@click.option("-p", "--pass", "pass_specs", multiple=True, metavar="NAME[:k=v,...]", help="Apply a graph pass before compiling; repeatable, applied in order (see `edgec passes`).")
@click.option("--no-verify", is_flag=True, help="Skip running the build against ONNX Runtime / PyTorch.")
@click.option("--rtol", type=click.FloatRange(0), default=1e-4, show_default=True, help="Verification: allowed error relative to each output's largest |value|.")
@click.option("--atol", type=click.FloatRange(0), default=1e-4, show_default=True, help="Verification: allowed absolute error, added to rtol's.")
@click.option("--qdq-steps", type=click.FloatRange(0), default=1.0, show_default=True, help="Verification of int8 (QDQ) graphs: allowed error in quantization steps of the output ((max - min) / 255).")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON on stdout.")
@click.option("--no-schedules", is_flag=True, help="Build without edgec's CPU schedule library: TVM's naive single-threaded kernels.")
@click.option("--no-winograd", is_flag=True, help="Keep every 3x3 convolution direct (no Winograd F(mxm, 3x3) convolutions).")
@click.option("--tuning-db", metavar="PATH|none", help="MetaSchedule database from `edgec tune` [default: ~/.cache/edgec/tuning/<target>/ when it exists].")
@_threads_option
def compile(model_path, target_spec, output, input_shapes, trust_pickle, pass_specs, no_verify, rtol, atol, qdq_steps, as_json, no_schedules, no_winograd, tuning_db, threads):  # noqa: A001
    """Compile MODEL for TARGET into an artifact directory.

    MODEL is a TorchScript (.pt), torch.export (.pt2) or ONNX (.onnx) file.
    The artifact holds lib.so (for the target's CPU), model.onnx (the graph
    that was compiled) and manifest.json. The build runs here (x86) or on an
    emulated board (ARM, qemu-user) and is checked against ONNX Runtime (and
    PyTorch) before it is kept; a failed compile leaves no artifact and keeps
    an older good one. An existing -o is replaced only if it is an edgec
    artifact holding nothing but its own files.
    """
    from edgec.core.artifact import check_replaceable
    from edgec.compiler import VerifyOptions
    from edgec.compiler import compile as compile_model
    from edgec.core.progress import ConsoleProgress
    from edgec.targets import resolve

    from edgec.apply_passes import apply
    from edgec.passes.registry import parse

    target = resolve(target_spec)
    passes = [parse(spec) for spec in pass_specs]  # bad pass specs fail before the slow load
    output = output or Path("build") / f"{model_path.stem}_{target.name}"
    check_replaceable(output.absolute())  # before the slow load; staging checks again at the end
    progress = ConsoleProgress()
    model = _load(model_path, input_shapes, trust_pickle, progress)
    if passes:
        with progress.stage("passes", ", ".join(spec.partition(":")[0] for spec in pass_specs)):
            apply(model, passes)
    from edgec.targets.schedules.winograd_graph import DEFAULT_POLICY
    from edgec.tuning_db import database_for_compile

    result = compile_model(
        model, target, output, verify=VerifyOptions(enabled=not no_verify, rtol=rtol, atol=atol, threads=threads, qdq_steps=qdq_steps), progress=progress,
        schedules=not no_schedules, tuning_db=database_for_compile(target, tuning_db), winograd=None if no_winograd else DEFAULT_POLICY,
    )
    from edgec.report import compile_summary

    if as_json:
        click.echo(json.dumps({"artifact": str(output), **result.manifest}, indent=2))
    else:
        compile_summary(result)


@cli.command()
@click.argument("artifact_path", metavar="ARTIFACT", type=click.Path(path_type=Path))
@click.option("-i", "--input", "input_files", multiple=True, type=click.Path(path_type=Path), help="Input .npy (one per model input, in order) or one .npz keyed by input name.")
@click.option("--random", "use_random", is_flag=True, help="Run on seeded random inputs instead of --input.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed for --random.")
@click.option("-o", "--output", type=click.Path(path_type=Path), help="Write outputs: .npy (single output) or .npz.")
@click.option("--json", "as_json", is_flag=True, help="Print output shapes and statistics as JSON.")
@_threads_option
def run(artifact_path, input_files, use_random, seed, output, as_json, threads):
    """Run a compiled ARTIFACT on this machine (x86 artifacts; CUDA artifacts on its GPU)."""
    from edgec.core.artifact import load_artifact
    from edgec.report import output_summary
    from edgec.core.inputs import random_inputs
    from edgec.runtimes.io import read_inputs, write_outputs
    from edgec.runtimes.local import LocalRunner

    artifact = load_artifact(artifact_path)
    if bool(input_files) == use_random:
        raise EdgecError("give either --input FILE.npy (repeatable) or --random")
    inputs = random_inputs(artifact.inputs, seed) if use_random else read_inputs(artifact, input_files)
    outputs = LocalRunner(artifact, threads).run(inputs)
    if output:
        write_outputs(artifact, outputs, output)
    output_summary(artifact, outputs, output, as_json)


@cli.command()
@click.argument("model_path", metavar="MODEL", type=click.Path(path_type=Path))
@_input_shape_option
@_trust_pickle_option
@click.option("--json", "as_json", is_flag=True, help="Print the per-layer table as JSON.")
def inspect(model_path, input_shapes, trust_pickle, as_json):
    """Show MODEL's layers: ops, output shapes, parameters, MACs, and its size."""
    from edgec.core.progress import ConsoleProgress
    from edgec.report import inspect_table

    model = _load(model_path, input_shapes, trust_pickle, ConsoleProgress())
    inspect_table(model, as_json)


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Print the passes and their options as JSON.")
def passes(as_json):
    """List the graph passes usable with `compile -p NAME[:key=value,...]`, with their options."""
    from edgec.report import passes_list

    passes_list(as_json)


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Print presets, TVM target JSON and toolchains as JSON.")
def targets(as_json):
    """List target presets, their TVM target JSON, and whether their compilers are installed."""
    from edgec.report import targets_table

    targets_table(as_json)


def _device_options(function):
    function = click.option("--timeout", type=click.FloatRange(0, min_open=True), default=60.0, show_default=True, help="Seconds to wait for the device or tracker before giving up.")(function)
    function = click.option("--key", metavar="KEY", help="Device key registered at the tracker (with --tracker).")(function)
    function = click.option("--tracker", metavar="HOST:PORT", help="Get a board from this TVM RPC tracker.")(function)
    function = click.option("--rpc", metavar="HOST:PORT", help="The board's RPC server (edgec device serve / edgec-agent).")(function)
    function = click.option("--local", "use_local", is_flag=True, help="Run on this machine (the default without --rpc/--tracker).")(function)
    return function


def _device(use_local: bool, rpc: str | None, tracker: str | None, key: str | None, timeout: float, threads: int):
    from edgec.runtimes.session import connect

    if use_local and (rpc or tracker):
        raise EdgecError("--local cannot be combined with --rpc/--tracker")
    return connect(rpc=rpc, tracker=tracker, key=key, timeout=timeout, threads=threads)


@cli.command()
@click.argument("artifact_path", metavar="ARTIFACT", type=click.Path(path_type=Path))
@_device_options
@click.option("--repeat", type=click.IntRange(1), default=50, show_default=True, help="Timed runs.")
@click.option("--warmup", type=click.IntRange(0), default=5, show_default=True, help="Untimed runs first (and at least 0.2 s of them, so threads settle; 0: none).")
@click.option("-i", "--input", "input_files", multiple=True, type=click.Path(path_type=Path), help="Input .npy per model input (default: seeded random).")
@click.option("--rtol", type=click.FloatRange(0), default=1e-4, show_default=True, help="Output check: allowed error relative to each output's largest |value|.")
@click.option("--atol", type=click.FloatRange(0), default=1e-4, show_default=True, help="Output check: allowed absolute error, added to rtol's.")
@click.option("--qdq-steps", type=click.FloatRange(0), default=1.0, show_default=True, help="Output check of int8 (QDQ) graphs: allowed error in output quantization steps.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@_threads_option
def bench(artifact_path, use_local, rpc, tracker, key, timeout, repeat, warmup, input_files, rtol, atol, qdq_steps, as_json, threads):
    """Time ARTIFACT end to end on a device (or --local) with the device's own timer.

    The device's outputs are checked against ONNX Runtime on the artifact's
    model.onnx first; a mismatch exits with status 1. On a board from `edgec
    device emulate` the device also counts the instructions of one inference
    (twice: equal counts show they are deterministic) and their ratio to the
    model's MACs.
    """
    from edgec.core.artifact import load_artifact
    from edgec.core.progress import ConsoleProgress
    from edgec.report import bench_summary
    from edgec.runtimes.bench import bench as run_bench
    from edgec.core.inputs import random_inputs
    from edgec.runtimes.io import read_inputs
    from edgec.runtimes.local import check_inputs

    artifact = load_artifact(artifact_path)
    inputs = read_inputs(artifact, input_files) if input_files else random_inputs(artifact.inputs)
    check_inputs(artifact, inputs)  # what the compiled code does not check (Gather indices, NaN)
    progress = ConsoleProgress()
    with progress.stage("connect", rpc or (f"{tracker} key {key}" if tracker else "local")):
        device = _device(use_local, rpc, tracker, key, timeout, threads)
    with device, progress.stage("bench", f"{repeat} runs after {warmup} warm-up"):
        result = run_bench(artifact, device, inputs, repeat=repeat, warmup=warmup, rtol=rtol, atol=atol, qdq_steps=qdq_steps)
    bench_summary(result, as_json)


@cli.command()
@click.argument("artifact_path", metavar="ARTIFACT", type=click.Path(path_type=Path))
@_device_options
@click.option("--repeat", type=click.IntRange(1), default=10, show_default=True, help="Timed runs per kernel and end to end.")
@click.option("--html", "html_path", type=click.Path(path_type=Path), help="Also write an HTML report with a bar chart.")
@click.option("--json", "as_json", is_flag=True, help="Print the profile as JSON.")
@_threads_option
def profile(artifact_path, use_local, rpc, tracker, key, timeout, repeat, html_path, as_json, threads):
    """Per-kernel profile of ARTIFACT measured on the device (or --local).

    Each compiled kernel is timed on the device by TVM's time evaluator with
    the shapes recorded at compile time; rows show the ONNX nodes the kernel
    came from, calls, time, share of the end-to-end time and GFLOP/s. On a
    board from `edgec device emulate` rows also show each kernel's
    instructions (all its calls), their share of the whole model's and
    instructions per MAC, and are sorted by instructions.
    """
    from edgec.core.artifact import load_artifact
    from edgec.core.progress import ConsoleProgress
    from edgec.report import profile_summary
    from edgec.runtimes.profile import profile as run_profile
    from edgec.runtimes.profile import write_html

    artifact = load_artifact(artifact_path)
    progress = ConsoleProgress()
    with progress.stage("connect", rpc or (f"{tracker} key {key}" if tracker else "local")):
        device = _device(use_local, rpc, tracker, key, timeout, threads)
    with device, progress.stage("profile", f"{len(artifact.manifest.get('kernels', []))} kernel calls"):
        result = run_profile(artifact, device, repeat=repeat)
    if html_path:
        write_html(result, html_path)
    profile_summary(result, as_json, html_path)


@cli.command()
@click.argument("model_path", metavar="MODEL", type=click.Path(path_type=Path))
@click.option("-t", "--target", "target_spec", required=True, metavar="TARGET", help="Target preset, e.g. x86 (measured here) or cortex-a53 (measured on a board via --tracker).")
@click.option("--trials", type=click.IntRange(1), required=True, help="Measured candidates in all (MetaSchedule max_trials_global).")
@click.option("--tuning-db", type=click.Path(path_type=Path), help="Database directory [default: ~/.cache/edgec/tuning/<target>/].")
@_input_shape_option
@_trust_pickle_option
@click.option("-p", "--pass", "pass_specs", multiple=True, metavar="NAME[:k=v,...]", help="Graph passes, as given to `edgec compile` (tuned kernels must match the compiled ones).")
@click.option("--rpc", metavar="HOST:PORT", help="Not supported: MetaSchedule measures on boards through a tracker (--tracker/--key).")
@click.option("--tracker", metavar="HOST:PORT", help="Measure on a board registered at this TVM RPC tracker.")
@click.option("--key", metavar="KEY", help="The board's key at the tracker.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@_threads_option
def tune(model_path, target_spec, trials, tuning_db, input_shapes, trust_pickle, pass_specs, rpc, tracker, key, as_json, threads):
    """Tune MODEL's kernels for TARGET with MetaSchedule into a tuning database.

    Slow (minutes per kernel on two cores); progress shows the best latency so
    far. Later `edgec compile` runs for the same target apply the records to
    every kernel they match, in any model, and the schedule library to the rest.
    """
    from edgec.apply_passes import apply
    from edgec.passes.registry import parse
    from edgec.core.progress import ConsoleProgress
    from edgec.runtimes.session import parse_address
    from edgec.targets import resolve
    from edgec.tune import tune as run_tune

    if rpc:
        raise EdgecError("edgec tune measures on boards through an RPC tracker: use --tracker HOST:PORT --key KEY")
    target = resolve(target_spec)
    passes = [parse(spec) for spec in pass_specs]
    progress = ConsoleProgress()
    model = _load(model_path, input_shapes, trust_pickle, progress)
    if passes:
        with progress.stage("passes", ", ".join(spec.partition(":")[0] for spec in pass_specs)):
            apply(model, passes)
    address = parse_address(tracker, "--tracker") if tracker else None
    with progress.stage("tune", f"{trials} trials for {target.spec}"):
        result = run_tune(
            model, target, trials=trials, database=tuning_db, threads=threads,
            tracker=address, key=key, report=lambda line: click.echo(f"  {line}", err=True),
        )
    summary = {
        "database": str(result.database), "tasks": result.tasks, "tuned": result.tuned, "trials": result.trials,
        "seconds": round(result.seconds, 1), "best_ms": result.best_ms, "estimated_total_ms": result.estimated_total_ms,
    }
    if as_json:
        click.echo(json.dumps(summary, indent=2))
    else:
        click.echo(
            f"tuned {len(result.tuned)} of {result.tasks} kernels ({result.trials} trials) in {result.seconds:.0f} s; "
            f"records in {result.database}"
        )


@cli.group()
def device():
    """Serve, build and emulate devices for `edgec bench/profile --rpc`."""


@device.command()
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind; anything but loopback exposes code execution to the network.")
@click.option("--port", type=click.IntRange(1, 65535), default=9090, show_default=True)
@click.option("--tracker", metavar="HOST:PORT", help="Register with this TVM RPC tracker.")
@click.option("--key", default="edgec", show_default=True, help="Device key to register at the tracker.")
def serve(host, port, tracker, key):
    """Run a TVM RPC server with edgec's device functions on this machine (a board with Python)."""
    from edgec.runtimes.serve import LOOPBACK, serve_forever, start_server
    from edgec.runtimes.session import parse_address

    if host not in LOOPBACK:
        click.echo(f"warning: binding {host}: anyone who can reach port {port} can upload and run code on this machine", err=True)
    tracker_address = parse_address(tracker, "--tracker") if tracker else None
    server = start_server(host, port, tracker=tracker_address, key=key)
    where = f", registering at tracker {tracker} with key {key!r}" if tracker else ""
    click.echo(f"edgec device server on {host}:{server.port}{where}; Ctrl-C to stop", err=True)
    serve_forever(server)


@device.command("build-agent")
@click.option("-t", "--target", "target_spec", required=True, metavar="TARGET", help="CPU preset of the board: cortex-a7 (armv7), cortex-a53/cortex-a55/cortex-a72 (aarch64) or x86.")
@click.option("-o", "--output", type=click.Path(path_type=Path), default=Path("edgec-agent"), show_default=True, help="Where to write the agent (a file, or a directory to put edgec-agent in).")
@click.option("-j", "--jobs", type=click.IntRange(1), default=None, help="Compilers run at once [default: CPU count].")
def build_agent(target_spec, output, jobs):
    """Cross-build edgec-agent: one file to copy to a board without Python.

    The agent is TVM's C++ runtime (from the pinned wheels' sources) with
    edgec's device functions; on the board run `./edgec-agent --port 9090
    [--tracker HOST:9190 --key KEY]`. The first build takes minutes; later
    ones come from ~/.cache/edgec/agent.
    """
    import os

    from edgec.core.progress import ConsoleProgress
    from edgec.runtimes.agent_build import build_agent as build

    binary = build(target_spec, output=output, progress=ConsoleProgress(), jobs=jobs or os.cpu_count() or 1)
    size_mb = binary.stat().st_size / 1e6
    click.echo(f"edgec-agent for {target_spec}: {binary} ({size_mb:.1f} MB); on the board: ./{binary.name} --port 9090")


@device.command()
@click.option("-t", "--target", "target_spec", required=True, type=click.Choice(["cortex-a7", "cortex-a53", "cortex-a55", "cortex-a72"]), help="The board to emulate.")
@click.option("--port", type=click.IntRange(1, 65535), default=9090, show_default=True, help="Loopback port to listen on.")
@click.option("--tracker", metavar="HOST:PORT", help="Register with this TVM RPC tracker.")
@click.option("--key", metavar="KEY", help="Device key at the tracker [default: the target name].")
@click.option("--no-count", is_flag=True, help="Do not count instructions: qemu-user-static, no plugin, the agent's default threads.")
def emulate(target_spec, port, tracker, key, no_count):
    """Run an emulated ARM board on 127.0.0.1: edgec-agent under qemu-user.

    The board counts the ARM instructions it executes (a QEMU plugin, one
    counter per thread, the target's -cpu, kernels on one thread): `edgec
    bench/profile MODEL --rpc 127.0.0.1:PORT` then report instructions per
    inference and per kernel, exact and the same on every run, beside the
    emulated times, which mean nothing (bench and profile say so). Needs
    Debian's qemu-user (make setup installs it).
    """
    import signal
    import time

    from edgec.core.progress import ConsoleProgress
    from edgec.runtimes.agent_build import build_agent as build
    from edgec.runtimes.emulate import emulate as start
    from edgec.runtimes.session import parse_address

    extra: tuple[str, ...] = ()
    if tracker:
        parse_address(tracker, "--tracker")
        extra = ("--tracker", tracker, "--key", key or target_spec)
    elif key:
        raise EdgecError("--key is the board's name at a tracker: give --tracker HOST:PORT with it")
    binary = build(target_spec, progress=ConsoleProgress())
    agent = start(target_spec, agent=binary, port=port, extra_args=extra, count_instructions=not no_count)
    previous = signal.signal(signal.SIGTERM, _interrupt)  # `kill` stops qemu too, as Ctrl-C does
    where = f", registered at tracker {tracker} with key {key or target_spec!r}" if tracker else ""
    counting = "" if no_count else ", counting instructions"
    click.echo(f"emulated {target_spec} board on {agent.address}{where}{counting}; Ctrl-C to stop", err=True)
    try:
        while agent.process.poll() is None:
            time.sleep(0.5)
        raise EdgecError(f"the emulated agent exited with status {agent.process.returncode}:\n{agent.log().strip()[-2000:]}")
    except KeyboardInterrupt:
        click.echo("stopping the emulated board", err=True)
    finally:
        agent.stop()
        signal.signal(signal.SIGTERM, previous)


def _interrupt(_signum, _frame):
    raise KeyboardInterrupt


def main() -> None:
    cli(prog_name="edgec")


if __name__ == "__main__":
    main()
