"""``edgec tune``: a tiny model tuned with a handful of MetaSchedule trials writes
a database that later compiles consult (explicitly, and by default from the
target's cache directory), recording in the manifest how many kernels took a
tuned schedule. Slow by nature (builder/runner workers import TVM): one
tuning run, shared by the tests.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

import edgec
from edgec.cli import cli
from edgec.core.errors import TuningError
from edgec.runtimes.local import LocalRunner
from edgec.runtimes.reference import run_onnxruntime
from edgec.targets import resolve
from edgec.tuning_db import DATABASE_FILES, database_for_compile, default_database, has_database

TRIALS = 2


@pytest.fixture(scope="module")
def cache(tmp_path_factory, saved_models):
    """EDGEC_CACHE pointed at a fresh directory, with the MLP tuned into its default database by the CLI."""
    root = tmp_path_factory.mktemp("edgec-cache")
    patch = pytest.MonkeyPatch()
    patch.setenv("EDGEC_CACHE", str(root))
    model = saved_models["mlp"].files["onnx"]
    done = CliRunner().invoke(cli, ["tune", str(model), "-t", "x86", "--trials", str(TRIALS), "--threads", "1", "--json"])
    yield root, model, done
    patch.undo()


def test_tune_writes_a_database_with_progress(cache):
    root, _, done = cache
    assert done.exit_code == 0, done.output
    summary = json.loads(done.stdout[done.stdout.index("{") :])
    database = Path(summary["database"])
    assert database == default_database(resolve("x86"))
    assert database.is_relative_to(root / "tuning")
    assert has_database(database)
    records = (database / "database_tuning_record.json").read_text().splitlines()
    assert len(records) >= 1
    assert summary["trials"] >= 1 and summary["best_ms"]
    assert "best" in done.stderr  # progress lines with the best latency so far


def test_later_compile_applies_the_database_by_default(cache, tmp_path):
    _, model_path, done = cache
    assert done.exit_code == 0, done.output
    output = tmp_path / "mlp_tuned"
    compiled = CliRunner().invoke(cli, ["compile", str(model_path), "-t", "x86", "-o", str(output), "--json"])
    assert compiled.exit_code == 0, compiled.output
    manifest = json.loads((output / "manifest.json").read_text())
    summary = manifest["schedules"]
    assert summary["tuning_db"] == str(default_database(resolve("x86")))
    assert summary["tuning_db_records"] >= 1
    # every MLP kernel whose library schedule was measured has a record and takes it; a build or
    # run the tuner reported as failed (MetaSchedule's workers time out on a loaded machine)
    # leaves that kernel without one. The ones where MetaSchedule's candidate measured faster
    # run it and say so in the kernel table.
    kernels = len({call["kernel"] for call in manifest["kernels"]})
    unmeasured = len(re.findall(r"library schedule of \S+ did not (?:build|run)", done.stderr))
    assert 1 <= summary["tuning_db_matched"] <= kernels
    assert summary["tuning_db_matched"] >= kernels - unmeasured
    tuned = {call["kernel"] for call in manifest["kernels"] if call["schedule"] == "tuning-db"}
    assert len(tuned) == summary["from_tuning_db"]
    assert manifest["verification"]["status"] == "passed"  # database schedules compute the same


def test_explicit_database_and_none(cache, tmp_path):
    _, model_path, done = cache
    assert done.exit_code == 0, done.output
    model = edgec.load(model_path)
    database = default_database(resolve("x86"))
    result = edgec.compile(model, "x86", tmp_path / "explicit", tuning_db=database)
    assert result.manifest["schedules"]["tuning_db_matched"] >= 1
    x = np.random.default_rng(5).standard_normal(result.manifest["inputs"][0]["shape"]).astype("float32")
    np.testing.assert_allclose(LocalRunner(result.artifact).run([x])[0], run_onnxruntime(model.graph, [x])[0], rtol=1e-4, atol=1e-4)
    plain = edgec.compile(model, "x86", tmp_path / "plain")  # the library API applies no database unless given
    assert plain.manifest["schedules"]["tuning_db"] is None
    assert plain.manifest["schedules"]["tuning_db_matched"] == 0
    assert database_for_compile(resolve("x86"), "none") is None
    assert database_for_compile(resolve("x86"), None) == database


def test_missing_database_is_an_error(tmp_path):
    with pytest.raises(TuningError, match="no MetaSchedule database"):
        database_for_compile(resolve("x86"), str(tmp_path / "nothing"))
    assert not has_database(tmp_path)
    assert DATABASE_FILES == ("database_workload.json", "database_tuning_record.json")


def test_tune_refuses_what_it_cannot_measure(saved_models):
    model = edgec.load(saved_models["mlp"].files["onnx"])
    from edgec.tune import tune

    with pytest.raises(TuningError, match="--tracker"):
        tune(model, "cortex-a53", trials=1)
    with pytest.raises(TuningError, match="dlight"):
        tune(model, "cuda", trials=1)
    done = CliRunner().invoke(cli, ["tune", str(saved_models["mlp"].files["onnx"]), "-t", "x86", "--trials", "1", "--rpc", "127.0.0.1:9090"])
    assert done.exit_code == 1 and "tracker" in done.output


def test_builder_workers_build_without_importing_the_tensor_intrinsics():
    """The builder's f_build compiles a kernel in a fresh process without importing
    tvm.s_tir.tensor_intrin (37 CPU-s per worker with MetaSchedule's default build)."""
    import subprocess
    import sys

    script = (
        "import sys\n"
        "import tvm\n"
        "from tvm import te\n"
        "from edgec.tune import _build_candidate\n"
        "a = te.placeholder((8,), name='a')\n"
        "b = te.compute((8,), lambda i: a[i] * 2.0, name='b')\n"
        "mod = tvm.IRModule({'main': te.create_prim_func([a, b])})\n"
        "lib = _build_candidate(mod, tvm.target.Target('llvm'), None)\n"
        "import numpy as np\n"
        "x = tvm.runtime.tensor(np.arange(8, dtype='float32'))\n"
        "y = tvm.runtime.empty((8,), 'float32')\n"
        "lib['main'](x, y)\n"
        "assert y.numpy().tolist() == [2.0 * i for i in range(8)], y.numpy()\n"
        "print('tvm.s_tir.tensor_intrin' in sys.modules)\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "False"
