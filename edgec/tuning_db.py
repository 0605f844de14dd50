"""Tuning databases at compile time: where ``edgec tune`` keeps them, which one a compile
uses, and the Relax pass that gives each kernel its best measured record (edgec/build.py).

A database is MetaSchedule's JSON pair (``DATABASE_FILES``) in one directory per
target, ``~/.cache/edgec/tuning/<target>/`` unless ``EDGEC_CACHE`` moves the root;
``edgec tune`` (edgec/tune.py) writes it.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Callable
from pathlib import Path

from edgec.core.errors import TuningError
from edgec.targets import ResolvedTarget

log = logging.getLogger(__name__)

DATABASE_FILES = ("database_workload.json", "database_tuning_record.json")


@dataclasses.dataclass(frozen=True)
class TuningReport:
    """What a tuning database gave one build: ``kernels`` took a tuned schedule (it measured
    faster than the library's), ``library_best`` kept the library's (recorded as the baseline)."""

    database: str
    records: int
    kernels: tuple[str, ...]
    library_best: tuple[str, ...]


def cache_root() -> Path:
    return Path(os.environ.get("EDGEC_CACHE", Path.home() / ".cache" / "edgec"))


def default_database(target: ResolvedTarget) -> Path:
    """``~/.cache/edgec/tuning/<target>/``; the host preset adds its CPU (``x86-znver5``)
    because records measured on one CPU are not the best schedule for another."""
    name = target.spec.replace(":", "_").replace(",", "_").replace("=", "-")
    if target.preset.mcpu is None:
        name = f"{name}-{target.tvm_json.get('mcpu', 'host')}"
    return cache_root() / "tuning" / name


def has_database(path: Path) -> bool:
    return all((path / name).is_file() for name in DATABASE_FILES)


def database_for_compile(target: ResolvedTarget, given: str | None) -> Path | None:
    """What ``edgec compile --tuning-db`` means: a path, ``none``, or (not given) the
    target's default database when one exists."""
    if given is not None:
        if given.lower() == "none":
            return None
        path = Path(given).expanduser()
        if not has_database(path):
            raise TuningError(
                f"--tuning-db {given}: no MetaSchedule database there (expected {' and '.join(DATABASE_FILES)}); "
                "create one with `edgec tune`"
            )
        return path
    path = default_database(target)
    if has_database(path):
        log.info("using tuning database %s", path)
        return path
    return None


def apply_database_pass(
    database_dir: Path, rules: list, schedules: dict[str, str | None], keep: Callable[[TuningReport], None],
    skip: dict[str, frozenset[str]] | None = None,
):
    """A module pass giving each kernel with a record in ``database_dir`` its best measured schedule.

    ``edgec tune`` records the schedule library's own schedule with its measured
    time next to MetaSchedule's candidates, so the best record is the library's
    unless the search beat it. ``schedules[kernel]`` becomes the library rule's
    name in the first case and ``"tuning-db"`` in the second; ``keep`` gets the
    :class:`TuningReport`. Kernels whose ``skip`` names
    ``"tuning-db"`` (their record broke an earlier build) keep their unscheduled form.
    """
    import tvm
    import tvm_ffi
    from tvm import relax, tirx
    from tvm.s_tir import meta_schedule as ms

    from edgec.targets.schedules import is_scheduled, schedule_func

    database = ms.database.JSONDatabase(work_dir=str(database_dir), module_equality="structural")

    @tvm.transform.module_pass(opt_level=0, name="EdgecApplyTuningDatabase")
    def _pass(mod, _ctx):
        originals = {gvar.name_hint: func for gvar, func in mod.functions_items() if isinstance(func, tirx.PrimFunc)}
        with database:
            mod = relax.transform.MetaScheduleApplyDatabase(enable_warning=False)(mod)
        tuned, library_best = [], []
        for gvar, func in list(mod.functions_items()):
            name = gvar.name_hint
            if name in originals and "tuning-db" in (skip or {}).get(name, ()):
                mod[gvar] = originals[name]
                continue
            if name not in originals or is_scheduled(originals[name]) or not is_scheduled(func):
                continue
            library, rule = schedule_func(originals[name], rules)
            plain = func.without_attr("tirx.is_scheduled")
            if rule is not None and tvm_ffi.structural_equal(library.without_attr("tirx.is_scheduled"), plain):
                library_best.append(name)
                schedules[name] = rule
            else:
                tuned.append(name)
                schedules[name] = "tuning-db"
        keep(TuningReport(str(database_dir), len(database), tuple(sorted(tuned)), tuple(sorted(library_best))))
        if len(database) and not tuned and not library_best:
            log.warning(
                "tuning database %s: none of its %d records matches a kernel of this build (tuned for other "
                "models, or recorded by an older edgec: aarch64 databases from before 2026-12-03); the schedule "
                "library schedules every kernel. `edgec tune` this model to record it",
                database_dir, len(database),
            )
        log.info(
            "tuning database %s (%d records): %d kernels took a tuned schedule, "
            "%d kept the library's (measured faster)",
            database_dir, len(database), len(tuned), len(library_best),
        )
        return mod

    return _pass

