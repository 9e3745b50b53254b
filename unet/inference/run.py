"""The inference run: settings, planning, the Ray Data pipeline and the part writer, in order."""

from __future__ import annotations

import concurrent.futures
import dataclasses
import datetime as _dt
import json
import logging
import tempfile
import time
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs

from .. import faults, storage
from ..settings import POSTPROCESS_DEFAULTS, check_postprocess, check_threshold
from ..runtime import ProgressLine, UsageError, quiet_native_stderr, require_cuda
from .decode import DEFAULT_MAX_PIXELS
from .lease import OutputLease
from .model import BACKENDS, MASK_RULE_KEYS, Predictor, backend_model, postprocess
from ..dicom import DICOM_COLUMNS
from .output import (ASSIGNMENT_SCHEMA, PartAssembler, assemble_part, delete_parts, fragment_assignments, list_parts,
                     output_schema, part_name, read_footer, write_fragments)
from .plan import Chunk, DoneIndex, PlanWriter, input_root, plan_inputs
from .read import DEFAULT_MAX_BYTES, read_and_decode_plan

if TYPE_CHECKING:  # annotations only: unet.artifact (and torch) is imported when a model is loaded
    from ..settings import ModelSettings

logger = logging.getLogger("unet.inference")

__all__ = ["InferenceConfig", "InferenceSummary", "run_inference"]

MAX_PENDING_WRITES = 8


@dataclass(frozen=True)
class InferenceConfig:
    """Everything one inference run needs (S3 endpoint and credentials come from the AWS_* env).

    Args:
        model: pretrained name, artifact directory or URI (:func:`unet.artifact.load_artifact`).
        input: folder/prefix, tar, Parquet or image file URI.
        output: folder/prefix URI for the Parquet parts.
        image_column / id_column: Parquet inputs: column with encoded image bytes / with ids.
        chunk_size: images (or Parquet rows) per output part.
        workers, batch_size, gpus_per_worker, cpus_per_worker: the model actor pool.
        threshold, tta, gate_threshold, min_area, largest_component: post-processing overrides
            (:class:`unet.settings.ModelSettings`); None = the artifact's (``config.json``
            ``threshold`` / ``postprocess``). ``gate_threshold=0`` switches the gate off.
        incremental: skip inputs already in the output; retry_errors: redo parts with errors.
        max_pixels / max_bytes: larger images / files become error rows.
        exclude: glob patterns on the relative path (e.g. ``*_mask*.png``) of files to ignore.
        check_resources: refuse a request the cluster cannot hold (off for autoscaling clusters).
        node_types: cluster YAML with the node types an autoscaling cluster can add
            (:mod:`unet.autoscaling`; default: found from the cluster, else a fixed cluster).
        wait_for_lease: wait while another run holds the output's lease, instead of refusing.
        backend: what runs the model in the actors, ``"torch"`` or ``"onnxruntime"`` (the graph
            exported once on the driver; :func:`unet.inference.model.backend_model`).
        save_probabilities: also write each probability map (``probability_png``; else null).
        dicom_columns: identifying DICOM attributes (of :data:`unet.dicom.DICOM_COLUMNS`) to write as
            columns of the same names; none by default (privacy).
    """

    model: str
    input: str
    output: str
    image_column: str = "image"
    id_column: str | None = None
    chunk_size: int = 1000
    workers: int = 1
    batch_size: int = 16
    gpus_per_worker: float = 0.0
    cpus_per_worker: float = 1.0
    threshold: float | None = None
    tta: bool | None = None
    gate_threshold: float | None = None
    min_area: float | None = None
    largest_component: bool | None = None
    incremental: bool = False
    retry_errors: bool = False
    max_pixels: int = DEFAULT_MAX_PIXELS
    max_bytes: int = DEFAULT_MAX_BYTES
    exclude: tuple[str, ...] = ()
    check_resources: bool = True
    node_types: str | None = None
    wait_for_lease: bool = False
    backend: str = "torch"
    save_probabilities: bool = False
    dicom_columns: tuple[str, ...] = ()

    def __post_init__(self):
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {', '.join(BACKENDS)}; got {self.backend!r}")
        for name in ("chunk_size", "workers", "batch_size", "max_pixels", "max_bytes"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer; got {value!r}")
        if self.gpus_per_worker < 0 or self.cpus_per_worker <= 0:
            raise ValueError(f"gpus_per_worker must be >= 0 and cpus_per_worker > 0; got "
                             f"{self.gpus_per_worker!r} and {self.cpus_per_worker!r}")
        if self.threshold is not None:
            check_threshold(self.threshold, "")
        check_postprocess({k: v for k in POSTPROCESS_DEFAULTS if (v := getattr(self, k)) is not None}, "")
        if self.retry_errors and not self.incremental:
            raise ValueError("retry_errors only makes sense with incremental (a full run redoes everything)")
        unknown = [c for c in self.dicom_columns if c not in DICOM_COLUMNS]
        if unknown or len(set(self.dicom_columns)) != len(self.dicom_columns):
            raise ValueError(f"dicom_columns must be distinct names of {', '.join(DICOM_COLUMNS)}; got "
                             f"{list(self.dicom_columns)}")
        if not self.image_column:
            raise ValueError("image_column must name the Parquet column holding image bytes")


@dataclass
class InferenceSummary:
    """What a run did (also written to ``<output>/_runs/``)."""

    output: str
    model_id: str
    mode: str
    parts_written: int = 0
    rows_ok: int = 0
    rows_error: int = 0
    units_planned: int = 0
    units_skipped: int = 0
    parts_deleted: int = 0
    driver_bytes: int = 0  # what the pipeline sent the driver: fragment summaries, no masks
    wall_s: float = 0.0

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _side_cpus(config: InferenceConfig) -> float:
    """CPUs requested by each non-model step (read + decode, post-process); also what they need
    beside the model actors, or the pipeline would wait forever for a free CPU.

    Half a CPU: reads wait on storage as much as they decode. It also keeps the remote args
    different from the model actors', which stops Ray Data from fusing decoding into the actors
    (they would then decode serially instead of feeding the model).
    """
    return 0.5 if config.cpus_per_worker != 0.5 else 0.25


def _check_resources(config: InferenceConfig) -> None:
    """Refuse what the cluster cannot hold, and probe the GPU a GPU run will use.

    On an autoscaling cluster (node types known, :mod:`unet.autoscaling`) the check is against
    the node types, not the nodes up now (often none), and the plan is printed; with
    ``check_resources`` off only the GPU probe runs there (it waits for the GPU node it asks for).
    """
    import ray

    from ..autoscaling import discover_node_types

    total = ray.cluster_resources()
    cpus, gpus = total.get("CPU", 0), total.get("GPU", 0)
    types = discover_node_types(config.node_types)
    if types is not None:
        _check_node_types(config, types)
    elif config.check_resources:
        need_cpu, beside = config.workers * config.cpus_per_worker, _side_cpus(config)
        # The model actors hold their CPUs for the whole run; every other step must still fit beside
        # them, or the pipeline waits forever for a free CPU.
        if need_cpu + beside > cpus + 1e-9:
            raise UsageError(f"--workers {config.workers} x --cpus-per-worker {config.cpus_per_worker:g} = "
                             f"{need_cpu:g} CPUs for the model, plus {beside:g} for reading and "
                             f"decoding, but the Ray cluster has {cpus:g} CPUs; use fewer workers or fewer "
                             f"CPUs per worker (or --no-check-resources on an autoscaling cluster)")
        need_gpu = config.workers * config.gpus_per_worker
        if need_gpu > gpus:
            raise UsageError(f"--workers {config.workers} x --gpus-per-worker {config.gpus_per_worker} needs "
                             f"{need_gpu:g} GPUs but the Ray cluster has {gpus:g} (or pass "
                             f"--no-check-resources on an autoscaling cluster)")
    else:
        return
    if config.gpus_per_worker > 0:
        require_cuda(config.gpus_per_worker, "--gpus-per-worker")


def _check_node_types(config: InferenceConfig, types) -> None:
    """The actors against the node types an autoscaling cluster can add (and the nodes up now)."""
    import ray

    actor = {"CPU": float(config.cpus_per_worker),
             **({"GPU": float(config.gpus_per_worker)} if config.gpus_per_worker else {})}
    fitting = [t.name for t in types.fitting(actor)]
    total = ray.cluster_resources()
    logger.info("resources: %d model actor(s) x %s + %g CPU for reading and decoding on node type(s) %s "
                "(autoscaling; %g CPU / %g GPU up now)", config.workers, actor, _side_cpus(config),
                ", ".join(fitting) or "none", total.get("CPU", 0), total.get("GPU", 0))
    if not config.check_resources:
        return
    live = [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")]
    if not fitting and not any(all(n.get(k, 0) >= v - 1e-9 for k, v in actor.items()) for n in live):
        raise UsageError(f"no node type can hold one model actor of {actor}: the autoscaler can add "
                         f"{types.describe()}; lower --cpus-per-worker/--gpus-per-worker or add a bigger node type")
    capacity = types.capacity(actor, live)
    if capacity < config.workers:
        raise UsageError(f"--workers {config.workers}: the cluster can never hold more than {capacity} model "
                         f"actor(s) of {actor} ({types.describe()}); use fewer workers")
    beside = _side_cpus(config)
    if not types.has_cpu(beside) and not any(n.get("CPU", 0) >= beside for n in live):
        raise UsageError(f"no node can give reading and decoding {beside:g} CPU: {types.describe()}; "
                         f"add a CPU node type")


def run_inference(config: InferenceConfig) -> InferenceSummary:
    """Run bulk inference as described in :mod:`unet.inference`; Ray must be initialised.

    Steps: load the model, list and plan the inputs (skipping those already in the output when
    incremental), run the Ray Data pipeline while writing parts, record the run.
    Returns an :class:`InferenceSummary`; raises ``ValueError`` / ``OSError`` for bad inputs that
    stop the whole job (missing input, no such model, Parquet without the image column, ...).
    """
    from ..artifact import load_artifact

    started = time.monotonic()
    loaded = load_artifact(config.model)
    settings = _settings(config, loaded)
    _check_resources(config)

    in_fs, in_path = storage.get_filesystem(config.input)
    out_fs, out_path = storage.get_filesystem(config.output)
    out_path = out_path.rstrip("/")
    storage.makedirs(config.output)
    root, root_uri, single = input_root(config.input, in_fs, in_path)
    summary = InferenceSummary(config.output, loaded.model_id, "incremental" if config.incremental else "full")

    # One run writes an output at a time: it holds the output's lease (unet.inference.lease) and
    # keeps its bookkeeping (plan files) under <output>/_tmp/<run id>. Leftovers of killed runs are
    # cleared once the lease is held, when no other run can be using them.
    run_id = f"{_dt.datetime.now(_dt.timezone.utc):%Y%m%dT%H%M%SZ}-{uuid.uuid4().hex[:8]}"
    tmp_path, tmp_uri = f"{out_path}/_tmp", storage.join(config.output, "_tmp")
    run_tmp = f"{tmp_path}/{run_id}"
    with OutputLease(config.output, run_id, wait=config.wait_for_lease) as lease:
        with storage.errors(tmp_uri, "clear leftovers of an interrupted run in"):
            out_fs.delete_dir_contents(tmp_path, missing_dir_ok=True)
        plan = PlanWriter(out_fs, f"{run_tmp}/plan", config.output)

        existing = list_parts(out_fs, out_path, config.output)
        with tempfile.TemporaryDirectory(prefix="unet-infer-") as scratch:
            done = _done_index(config, scratch, existing, out_fs, out_path, loaded.model_id,
                               _part_settings(settings, config), root_uri, summary) if config.incremental else None
            try:
                chunks, summary.units_planned, summary.units_skipped = plan_inputs(
                    config, in_fs, root, root_uri, single, done, plan)
            finally:
                if done is not None:
                    done.close()
        if not config.incremental:
            # Parts of an earlier layout (other inputs or chunk size) would duplicate rows: remove
            # them before any work, so that even an interrupted run never leaves an input twice.
            planned = {part_name(k) for k in chunks}
            stale = [n for n in existing if n not in planned]
            summary.parts_deleted += delete_parts(out_fs, out_path, config.output, stale)
            if stale:
                logger.info("full run: deleted %d parts from earlier runs that are not in this plan", len(stale))
        logger.info("planned %d inputs in %d chunks (%d plan rows); %d already done",
                    summary.units_planned, len(chunks), plan.total, summary.units_skipped)

        if chunks:
            _execute(config, loaded, chunks, plan.tasks, in_fs, root, root_uri, settings, summary, run_id)
        if lease.lost:
            raise RuntimeError(f"{config.output}: this run lost its lease to another run while writing (it "
                               f"could not renew it for {lease.ttl_s:g} s); rerun with --incremental")
        with storage.errors(tmp_uri, "clean up"):  # all of _tmp is this run's while it holds the lease
            if out_fs.get_file_info(tmp_path).type != pafs.FileType.NotFound:
                out_fs.delete_dir(tmp_path)
        summary.wall_s = round(time.monotonic() - started, 3)
        logger.info("wrote %d part(s) to %s: %d images segmented, %d error rows, in %.1f s",
                    summary.parts_written, config.output, summary.rows_ok, summary.rows_error, summary.wall_s)
        record = {"summary": summary.to_dict(), "config": dataclasses.asdict(config),
                  "threshold": settings.threshold, "postprocess": _used_postprocess(settings),
                  "input_size": list(settings.input_size),
                  "normalization": settings.normalization,
                  "output_schema": [f"{f.name}: {f.type}" for f in output_schema(config.dicom_columns)]}
        storage.write_bytes(storage.join(config.output, "_runs", f"run-{run_id}.json"),
                            (json.dumps(record, indent=2, default=str) + "\n").encode())
    return summary


def _settings(config: InferenceConfig, loaded) -> ModelSettings:
    """The artifact's settings with the run's overrides; checks they fit the model."""
    from ..shards import CLASSES

    settings = loaded.settings.with_postprocess(
        threshold=config.threshold, tta=config.tta, gate_threshold=config.gate_threshold,
        min_area=config.min_area, largest_component=config.largest_component)
    if settings.gate_threshold == 0.0:  # "--gate-threshold 0": no gate, recorded as such
        settings = dataclasses.replace(settings, gate_threshold=None)
    classes = getattr(loaded.model, "image_classes", 0)
    if classes and classes != len(CLASSES):
        raise UsageError(f"{config.model}: the model's image head has {classes} classes; inference reads "
                         f"lesion and malignancy probabilities from a head over {len(CLASSES)} classes "
                         f"{CLASSES}")
    if settings.gate_threshold is not None and not classes:
        raise UsageError(f"{config.model}: gate threshold {settings.gate_threshold:g} needs a model with an "
                         f"image-level head, and this one has none (pass --gate-threshold 0 for no gate)")
    return settings


def _used_postprocess(settings: ModelSettings) -> dict:
    """The post-processing a run uses, as recorded in its run record."""
    return {"threshold": settings.threshold, **settings.postprocess}


def _part_settings(settings: ModelSettings, config: InferenceConfig) -> dict:
    """What a part's rows depend on besides model and input, recorded in its footer: the
    post-processing and the optional columns (so an incremental run cannot mix parts that differ)."""
    return {**_used_postprocess(settings), "save_probabilities": config.save_probabilities,
            "dicom_columns": list(config.dicom_columns)}


def _done_index(config: InferenceConfig, scratch: str, existing: list[str], out_fs, out_path: str,
                model_id: str, postprocess: dict, root_uri: str, summary: InferenceSummary) -> DoneIndex:
    """Index the units the output's parts already cover, reading one footer at a time.

    Parts made by another model, with other mask settings or from another input root would be
    mixed with this run's masks, or match inputs that are not the same files: refused with a
    :class:`UsageError` (parts deleted for ``retry_errors`` are redone and do not count). Parts
    from before these were recorded in the footers are not compared.
    """
    done = DoneIndex(scratch)
    retry, keep = [], []
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        footers = pool.map(lambda n: (n, read_footer(out_fs, f"{out_path}/{n}", storage.join(config.output, n))),
                           existing)
        for name, (units, errors, part_model, part_postprocess, part_input) in footers:
            if config.retry_errors and errors:
                retry.append(name)
                continue
            differences = _differences(part_model, part_postprocess, part_input, model_id, postprocess, root_uri)
            if differences:
                raise UsageError(
                    f"--incremental: {config.output} already holds masks made with other settings "
                    f"({'; '.join(differences)}; part {name}); run without --incremental to redo every "
                    f"input with this run's settings, or write to another --output")
            keep.append(name)
            done.add(units)
    # Deleted before the rerun, not after: an interrupted retry then simply leaves them to do.
    summary.parts_deleted += delete_parts(out_fs, out_path, config.output, retry)
    logger.info("incremental: %d units already in %d parts; %d parts with errors deleted for retry",
                done.count, len(keep), len(retry))
    return done


def _differences(part_model: str, part_postprocess: dict | None, part_input: str | None, model_id: str,
                 postprocess: dict, root_uri: str) -> list[str]:
    """What a part recorded that differs from this run: model, input root, each mask setting."""
    out = []
    if part_model != model_id:
        out.append(f"model {part_model}, this run {model_id}")
    if part_input is not None and part_input != root_uri:
        out.append(f"input {part_input}, this run {root_uri}")
    for key, value in (part_postprocess or {}).items():
        if key in postprocess and postprocess[key] != value:
            out.append(f"{key} {json.dumps(value)}, this run {json.dumps(postprocess[key])}")
    return out


def _execute(config: InferenceConfig, loaded, chunks: dict[str, Chunk], read_tasks: list[dict], in_fs,
             root: str, root_uri: str, settings: ModelSettings, summary: InferenceSummary, run_id: str) -> None:
    """Build the Ray Data pipeline over the plan and have parts written as chunks complete.

    The rows never come to the driver: the pipeline's last step writes them where they are, as
    fragment files in ``<output>/_tmp/`` (:func:`~.output.write_fragments`), and
    sends the driver a few bytes per image (which positions of which chunk each fragment holds).
    The driver only counts positions (:class:`PartAssembler`: duplicates from retried tasks are
    dropped there) and, when a chunk is complete, starts a task that assembles its part from the
    fragments (:func:`~.output.assemble_part`). ``summary.driver_bytes`` counts what it received.
    """
    import ray

    out_fs, out_path = storage.get_filesystem(config.output)
    out_path = out_path.rstrip("/")
    # Fragments: <output>/_tmp/<run id>-frag-<chunk>-<positions>.parquet (write_fragments says why flat).
    fragments = dict(fs=out_fs, directory=f"{out_path}/_tmp", uri=storage.join(config.output, "_tmp"),
                     prefix=f"{run_id}-frag-")
    # One block per read task (a row group of a plan file), read and decoded by one Ray task: no
    # separate plan-reading step or repartition (ray.data.read_parquet's listing and footer pass
    # alone cost seconds per run).
    ds = ray.data.from_items(read_tasks, override_num_blocks=len(read_tasks))
    ds = ds.map_batches(
        read_and_decode_plan, batch_format="pyarrow", batch_size=None, num_cpus=_side_cpus(config),
        fn_kwargs=dict(plan_fs=out_fs, fs=in_fs, root=root, root_uri=root_uri,
                       input_size=settings.input_size, image_column=config.image_column,
                       id_column=config.id_column, max_pixels=config.max_pixels, max_bytes=config.max_bytes,
                       dicom_columns=config.dicom_columns))
    ds = ds.map_batches(
        Predictor, batch_format="numpy", batch_size=config.batch_size,
        compute=ray.data.ActorPoolStrategy(size=config.workers),
        num_cpus=config.cpus_per_worker, num_gpus=config.gpus_per_worker or None,
        fn_constructor_kwargs=dict(model=backend_model(loaded, config.backend), settings=settings,
                                   use_gpu=config.gpus_per_worker > 0, num_threads=int(config.cpus_per_worker),
                                   fault_drill=faults.current(), backend=config.backend))
    ds = ds.map_batches(postprocess, batch_format="numpy", batch_size=None, num_cpus=_side_cpus(config),
                        fn_kwargs=dict(mask_rule={k: getattr(settings, k) for k in MASK_RULE_KEYS},
                                       model_id=loaded.model_id, save_probabilities=config.save_probabilities,
                                       dicom_columns=config.dicom_columns))
    # Same resources as post-processing, so Ray Data fuses the two: the rows go from the task that
    # made them straight to storage.
    ds = ds.map_batches(write_fragments, batch_format="pyarrow", batch_size=None, num_cpus=_side_cpus(config),
                        fn_kwargs=fragments)

    # Part tasks ask for the side steps' CPUs (they then fit wherever those do) and are spread over
    # the nodes, so no one node reads every fragment and writes every part.
    assemble = ray.remote(assemble_part).options(num_cpus=_side_cpus(config), scheduling_strategy="SPREAD")
    part_kwargs = dict(fs=out_fs, fragments=fragments["directory"], fragments_uri=fragments["uri"],
                       prefix=fragments["prefix"], out_path=out_path, out_uri=config.output, model_id=loaded.model_id,
                       postprocess=_part_settings(settings, config), input_root=root_uri,
                       dicom_columns=config.dicom_columns)
    pending: list = []  # the part tasks in flight

    def write(chunk: Chunk, assigned: pa.Table) -> None:
        pending.append(assemble.remote(chunk, assigned.select(["_seq", "fragment"]), **part_kwargs))
        while len(pending) >= MAX_PENDING_WRITES:  # bound the parts being assembled
            _collect(pending, summary, wait=True)

    assembler = PartAssembler(chunks, write, empty=ASSIGNMENT_SCHEMA)
    progress, rows = ProgressLine(logger.info), 0
    # Ray Data starts its model actors here; see quiet_native_stderr for the line it keeps quiet.
    with quiet_native_stderr():
        for batch in ds.iter_batches(batch_format="pyarrow", batch_size=None, prefetch_batches=1):
            summary.driver_bytes += batch.nbytes
            assigned = fragment_assignments(batch)
            assembler.add(assigned)
            _collect(pending, summary, wait=False)
            rows += int(pc.sum(pc.greater_equal(assigned.column("_seq"), 0)).as_py() or 0)
            progress.update(f"{rows} images done; {summary.parts_written}/{len(chunks)} parts written")
    while pending:
        _collect(pending, summary, wait=True)
    if logger.isEnabledFor(logging.DEBUG):
        logger.debug("Ray Data stats:\n%s", ds.stats())
    if assembler.duplicates:
        logger.info("dropped %d duplicate rows from retried tasks", assembler.duplicates)
    missing = assembler.incomplete()
    if missing:
        raise RuntimeError(f"{len(missing)} chunk(s) did not receive all their rows and were not written "
                           f"(a bug; rerun with --incremental to complete): {missing[:5]}")


def _collect(pending: list, summary: InferenceSummary, wait: bool) -> None:
    """Count the finished part tasks (waiting for one if ``wait``); a failed one raises here and
    stops the job."""
    import ray

    if not pending:
        return
    done, _ = ray.wait(pending, num_returns=1 if wait else len(pending), timeout=None if wait else 0)
    for ref in done:
        pending.remove(ref)
        ok, errors = ray.get(ref)
        summary.parts_written += 1
        summary.rows_ok += ok
        summary.rows_error += errors
