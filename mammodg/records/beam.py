"""``mammodg build-tfrecords --runner beam``: the per-image step of the builder on Apache Beam.

Beam runs :func:`~mammodg.records.rows.process_row` on every row not yet cached, and each worker
writes the row's cache entry into ``<out>/_cache``; the launching process then assembles the shards,
``dataset.json``, ``rejects.csv`` and ``provenance.csv`` exactly as the local build does, so both give
the same records. Embedded by default (FnApiRunner, one process per worker, nothing downloaded); Flink,
Spark or Dataflow through pipeline options, with ``--out`` and the images on storage every worker sees.
"""
from __future__ import annotations

import contextlib
import dataclasses
import io
import pickle
import sys

from mammodg.records.rows import RowTask, is_done, process_row
from mammodg.records.shards import BuildError

# Embedded: the portable FnApiRunner with one process per worker. Beam's default (DirectRunner)
# first tries to download a runner binary, which fails without internet.
DEFAULT_OPTIONS = {"runner": "FnApiRunner", "direct_running_mode": "multi_processing"}
CHUNK = 500  # tasks per pickled chunk file: the pipeline graph holds chunk paths, never 250,000 tasks


def _import_beam():
    try:
        import apache_beam
    except ImportError:
        raise BuildError("--runner beam needs Apache Beam: pip install 'mammodg[beam]'") from None
    return apache_beam


def parse_options(pairs: list[str], workers: int) -> list[str]:
    """``KEY=VALUE`` (or a bare ``KEY`` for a switch) -> Beam's ``--KEY=VALUE`` flags, over the defaults."""
    opts = DEFAULT_OPTIONS | {"direct_num_workers": str(workers)}
    switches = []
    for pair in pairs:
        key, eq, value = pair.lstrip("-").partition("=")
        if not key or (eq and not value):
            raise BuildError(f"--beam-option {pair!r}: expected KEY=VALUE (e.g. runner=FlinkRunner) or a bare switch KEY")
        if eq:
            opts[key] = value
        else:
            switches.append(f"--{key}")
    return [f"--{k}={v}" for k, v in opts.items()] + switches


def _check_options(flags: list[str]):
    """Parse the flags and resolve the runner before any work: a bad value is one line, not Beam's usage text."""
    from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions
    from apache_beam.runners.runner import create_runner

    options = PipelineOptions(flags)  # sets up logging: outside the redirect below
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):  # argparse prints its whole usage, then exits
            options.get_all_options()  # parses every flag now (an unknown one is dropped with a warning)
    except SystemExit:
        last = (err.getvalue().strip().splitlines() or ["invalid option"])[-1]
        raise BuildError(f"--beam-option: {last.split('error: ', 1)[-1]}") from None
    runner = options.view_as(StandardOptions).runner or "DirectRunner"
    try:
        create_runner(runner)
    except (ValueError, ImportError) as e:
        raise BuildError(f"--beam-option runner={runner}: {str(e).split('. ')[0]}") from None
    return options, runner


def _load_chunk(path: str) -> list[RowTask]:
    with open(path, "rb") as f:
        return pickle.load(f)


def _is_local(runner: str) -> bool:
    from apache_beam.options.pipeline_options import StandardOptions

    name = runner.rsplit(".", 1)[-1]
    return any(name.lower() in (r.lower(), r.lower().removesuffix("runner")) for r in StandardOptions.LOCAL_RUNNERS)


def run_on_beam(tasks: list[RowTask], workers: int, progress: bool, pairs: list[str]) -> None:
    """Run :func:`process_row` on ``tasks`` in one Beam pipeline; every task is cached when it returns.

    A failed pipeline raises BuildError; the rows it finished stay cached, so a re-run resumes.
    """
    if not tasks:
        return
    beam = _import_beam()
    flags = parse_options(pairs, workers)
    options, runner = _check_options(flags)
    if not _is_local(runner):
        relative = [t.row.line for t in tasks if not t.row.image_path.is_absolute()]
        if relative:
            raise BuildError(f"--runner beam with {runner}: manifest line {relative[0]} has a relative image path that "
                             f"remote workers cannot resolve; pass --manifest as an absolute path on shared storage")
    cache = tasks[0].cache.resolve()  # workers may start in another folder
    tasks = [dataclasses.replace(t, cache=cache) for t in tasks]
    chunks = []
    try:
        for i in range(0, len(tasks), CHUNK):
            chunks.append(cache / f"beam-tasks-{i // CHUNK:06d}.pkl")
            chunks[-1].write_bytes(pickle.dumps(tasks[i:i + CHUNK]))
        if progress:
            print(f"preprocess: {len(tasks)} image(s) on Apache Beam ({runner}, {' '.join(flags)})", file=sys.stderr)
        try:
            with beam.Pipeline(options=options) as p:
                (p
                 | "chunks" >> beam.Create([str(c) for c in chunks])
                 | "tasks" >> beam.FlatMap(_load_chunk)
                 | "spread" >> beam.Reshuffle()  # one chunk's rows over many workers
                 | "process_row" >> beam.Map(process_row))
        except Exception as e:  # a runner, cluster or worker failure: one line, the cache keeps the finished rows
            first = (str(e).strip().splitlines() or [""])[0][:300]
            raise BuildError(f"the Beam pipeline ({runner}) failed: {type(e).__name__}: {first}; "
                             f"re-run the same command to resume") from None
    finally:
        for c in chunks:
            c.unlink(missing_ok=True)
    missing = [t.row.line for t in tasks if not is_done(t)]
    if missing:
        raise BuildError(f"the Beam pipeline ({runner}) ended with {len(missing)} row(s) unprocessed (first: manifest line "
                         f"{missing[0]}); is --out on storage every worker writes to? Re-run the same command to resume")


def beam_runner(pairs: list[str] | None = None):
    """A ``run_tasks`` for :func:`mammodg.records.writer.build` that runs on Beam with ``pairs`` (KEY=VALUE)."""
    _import_beam()  # fail before the build writes anything when Beam is missing or an option is bad
    _check_options(parse_options(list(pairs or []), 1))
    return lambda tasks, workers, progress: run_on_beam(tasks, workers, progress, list(pairs or []))
