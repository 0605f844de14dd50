"""Per layer: edgec's kernels beside ONNX Runtime's nodes on the same model.onnx, sorted by loss.

    python bench/layers_vs_ort.py BUILD [--threads 1] [--repeat 50] [--rows 25] [--json out.json]

BUILD is an x86 artifact from ``edgec compile`` (its model.onnx is the graph edgec compiled,
after the passes). edgec's side is ``edgec profile --local``'s measurement (each kernel timed
alone by TVM's timer, the rows naming the ONNX nodes they compute); ONNX Runtime's side is its
own profiler (``SessionOptions.enable_profiling``, ORT_ENABLE_ALL, ``intra_op_num_threads`` =
``--threads``): the median duration of each node over ``--repeat`` runs. ORT names a fused or
NCHWc node after the tensor it writes (``<tensor>_nchwc``), so an ORT node is matched to the
ONNX node that produces that tensor, then to the edgec row computing that node; ORT's layout
reorders and what matches no row are shown as rows of their own. ORT's profiler adds a few
microseconds per node, so ORT's sum is above its unprofiled end-to-end time: read the ratios
of the large rows. Both run in this one process, one after the other.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

import numpy as np

WARMUP = 10


def ort_node_ms(model_path: Path, threads: int, repeat: int) -> tuple[dict[str, tuple[str, float]], float]:
    """ORT's profiled node -> (op type, median ms per run) and its end-to-end median ms."""
    import time

    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.enable_profiling = True
    options.profile_file_prefix = str(Path(tempfile.mkdtemp()) / "ort")
    session = ort.InferenceSession(str(model_path), options, providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    feed = {
        spec.name: rng.standard_normal([d if isinstance(d, int) else 1 for d in spec.shape]).astype(np.float32)
        for spec in session.get_inputs()
    }
    seconds = []
    for index in range(WARMUP + repeat):
        start = time.perf_counter()
        session.run(None, feed)
        if index >= WARMUP:
            seconds.append(time.perf_counter() - start)
    events = json.loads(Path(session.end_profiling()).read_text())
    durations: dict[str, list[float]] = defaultdict(list)
    op_of: dict[str, str] = {}
    for event in events:
        name = event.get("name", "")
        if event.get("cat") == "Node" and name.endswith("_kernel_time"):
            node = name[: -len("_kernel_time")]
            durations[node].append(event["dur"] / 1e3)
            op_of[node] = event.get("args", {}).get("op_name", "?")
    nodes = {node: (op_of[node], statistics.median(times[WARMUP:] or times)) for node, times in durations.items()}
    return nodes, statistics.median(seconds) * 1e3


def onnx_producers(model_path: Path) -> tuple[dict[str, str], set[str]]:
    """Tensor name -> the ONNX node that writes it; and the node names."""
    import onnx

    graph = onnx.load(str(model_path), load_external_data=False).graph
    producers = {output: node.name for node in graph.node for output in node.output}
    return producers, {node.name for node in graph.node}


def match(ort_nodes: dict[str, tuple[str, float]], producers: dict[str, str], names: set[str], rows: list) -> list[dict]:
    """One line per edgec row (with the ORT nodes matched to it), then ORT's unmatched nodes."""
    row_of_node = {node: index for index, row in enumerate(rows) for node in row.onnx_nodes}
    lines = [{"kernel": row.kernel, "onnx_nodes": row.onnx_nodes, "shapes": row.shapes, "calls": row.calls,
              "edgec_ms": row.total_ms, "ort_ms": 0.0, "ort_nodes": []} for row in rows]
    unmatched = []
    for node, (op, ms) in ort_nodes.items():
        tensor = node[: -len("_nchwc")] if node.endswith("_nchwc") else node
        source = node if node in names else producers.get(tensor)
        index = row_of_node.get(source)
        if index is None:
            unmatched.append({"kernel": f"(ORT only) {op}", "onnx_nodes": [node], "shapes": "", "calls": 1,
                              "edgec_ms": 0.0, "ort_ms": ms, "ort_nodes": [node]})
        else:
            lines[index]["ort_ms"] += ms
            lines[index]["ort_nodes"].append(f"{op}:{node}")
    return lines + unmatched


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("build", type=Path, help="an x86 artifact directory (edgec compile ... -t x86 -o BUILD)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeat", type=int, default=50, help="timed runs per side")
    parser.add_argument("--rows", type=int, default=25, help="rows to print, largest loss first")
    parser.add_argument("--json", type=Path, help="write every row here")
    args = parser.parse_args(argv)

    from edgec.core.artifact import load_artifact
    from edgec.runtimes.profile import profile
    from edgec.runtimes.session import connect

    artifact = load_artifact(args.build)
    model_path = args.build / "model.onnx"
    if not model_path.is_file():
        print(f"Error: {model_path} is missing; recompile with: edgec compile MODEL -t x86 -o {args.build}", file=sys.stderr)
        return 2
    ort_nodes, ort_e2e = ort_node_ms(model_path, args.threads, args.repeat)
    with connect(threads=args.threads) as device:
        result = profile(artifact, device, repeat=args.repeat)
    producers, names = onnx_producers(model_path)
    lines = match(ort_nodes, producers, names, result.rows)
    lines.sort(key=lambda line: -(line["edgec_ms"] - line["ort_ms"]))
    print(f"load average {' '.join(f'{v:.2f}' for v in os.getloadavg())}; threads {args.threads}")
    print(f"end to end: edgec {result.end_to_end_ms:.3f} ms (kernel sum {result.kernels_ms:.3f}), "
          f"ORT {ort_e2e:.3f} ms profiled (node sum {sum(ms for _, ms in ort_nodes.values()):.3f})")
    print(f"{'edgec ms':>9} {'ORT ms':>8} {'ratio':>6} {'loss ms':>8}  kernel / shapes")
    for line in lines[: args.rows]:
        ratio = f"{line['edgec_ms'] / line['ort_ms']:.2f}" if line["ort_ms"] > 0 else "-"
        print(f"{line['edgec_ms']:9.4f} {line['ort_ms']:8.4f} {ratio:>6} {line['edgec_ms'] - line['ort_ms']:8.4f}"
              f"  {line['kernel'][:48]} x{line['calls']} {line['shapes']}")
    if args.json:
        args.json.write_text(json.dumps({"edgec_end_to_end_ms": result.end_to_end_ms, "ort_end_to_end_ms": ort_e2e,
                                         "rows": lines}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
