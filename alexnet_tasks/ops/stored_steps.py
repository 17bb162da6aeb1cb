"""The pipeline's steps on an object-store artifacts root: fetch what a step reads, run it, put what it wrote.

With ``ALEXNET_ARTIFACTS=s3://bucket/prefix`` no two tasks need to share a
disk. Each step runs on this host's cache (``store.store_cache``: the store's
layout under ``$ALEXNET_CACHE``) exactly as it runs on a local root, between
two transfers:

* ``download``, ``split``, ``build_shards``: content-addressed data folders
  (``data.stored.stored_folder``): fetched and checked against their
  ``contents.json`` when the store has them, else built here and put there
  with a create-only manifest (two hosts building one key at once agree).
* ``train``: takes the run's training lease (``runs/<run>/lease.json``,
  ``store.Lease``), replaces this host's copy of the run's committed state
  with the store's (so a retry on another host resumes from the last epoch
  committed anywhere), and after each epoch puts the checkpoint, the
  TensorBoard logs and ``config.json`` on the store, then ``state.json``:
  the epoch is committed once ``state.json`` is there. The model, the
  history and ``train_summary.json`` (last) follow the last epoch.
* ``evaluate``, ``gate``: fetch the run's folder (not its checkpoints),
  run, put what they wrote (``metrics.json``, ``decision.json`` last).
* ``publish``: the copy is built in the cache and put under
  ``published/runs/<run>/``, then the index line and the champion pointer
  move on the store by conditional writes (``release.registry.S3Store``).
  Then retention, on the store (``release.retention.drop_stored_checkpoints``
  and ``prune_stored_runs``: the run's checkpoints, then the old runs
  nothing keeps) and in this host's cache (the run's checkpoints, the
  copies of pruned runs).
* ``approve`` (``publish_mode=approval``): reads the store's
  ``decision.json`` (``fetch_decision``); its answer, ``approval.json``,
  is put beside it (``put_run``) for publish to read.
* ``promote`` (the promote DAG): the same checks as on a local root, through
  the store's registry; the champion pointer and the promotion history move
  by conditional writes.
* ``predict`` (the predict DAG): the champion's folder, model included, is
  fetched into the cache; the store's ``inbox/`` too when no input folder
  is given; the predictions go to ``scored/<run>/`` on the store.
* a sweep's ``select`` reads each trial's summary and history from the
  store and writes the sweep's record there (``published/sweeps/``); its
  trials train through ``train`` above, each holding one of the sweep's
  slots (``store.lease_slot``: leases ``sweeps/<run>/slots/<n>.json``).

A step called from Python opens the store with the library's credentials
(``store.open_store``); the DAG's tasks with the Airflow connection
``$ALEXNET_ARTIFACTS_CONN_ID``.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

from alexnet_tasks.config import PipelineConfig
from alexnet_tasks.layout import (
    CHECKPOINTS,
    CONFUSION_MATRIX,
    EXTRACTED,
    PLAIN_PREDICTIONS,
    PREDICTIONS,
    TEST_SAMPLES,
    CONFIG,
    DECISION,
    HISTORY,
    LEASE,
    METRICS,
    MODEL,
    STATE,
    TENSORBOARD,
    TRAIN_SUMMARY,
    Layout,
)
from alexnet_tasks.store import Lease, ObjectStore

log = logging.getLogger(__name__)


def _key(layout: Layout, path: Path) -> str:
    """The store key of a path under the layout's root (this host's cache of the store)."""
    return Path(path).relative_to(layout.root).as_posix()


def _store(layout: Layout) -> ObjectStore:
    if layout.store is None:
        raise ValueError(f"{layout.root}: a local artifacts root; these steps need an object-store one")
    return layout.store


# --------------------------------------------------------------------------- data
SOURCE_SUMMARY = "source.json"  # the download's summary in data/<md5>/source/ (data.download)
EXTRACTED_FILES = (f"{EXTRACTED}/", SOURCE_SUMMARY)  # what later steps read of the source: not the archive


def fetch_batches(config: PipelineConfig, layout: Layout) -> Path:
    """The source batches in this host's cache, fetched and checked (raises ``MissingInputError`` if not stored)."""
    _store(layout).fetch_folder(_key(layout, layout.source(config.source_md5)), layout.root, only=EXTRACTED_FILES)
    return layout.batches(config.source_md5)


def download(config: PipelineConfig, layout: Layout) -> dict:
    """The verified source on the store (``data/<md5>/source``): downloaded here once, else its batches fetched."""
    import json

    from alexnet_tasks.data.download import download as fetch_source
    from alexnet_tasks.data.stored import stored_folder

    store, folder = _store(layout), layout.source(config.source_md5)
    if store.contents(_key(layout, folder)) is not None:
        fetch_batches(config, layout)
        summary = json.loads((folder / SOURCE_SUMMARY).read_text())
        result = {**summary, "source_dir": str(folder), "batch_dir": str(layout.batches(config.source_md5)),
                  "reused": True}
    else:
        stored = stored_folder(store, _key(layout, folder),
                               lambda root: fetch_source(config.source_url, config.source_md5, root), layout.root)
        result = stored["result"]
    return {**result, "store": store.url(_key(layout, folder))}


def split(config: PipelineConfig, layout: Layout) -> dict:
    from alexnet_tasks.data.split import split as split_source
    from alexnet_tasks.data.stored import stored_folder

    store = _store(layout)
    folder = layout.split(config)

    def build(root: Path):
        return split_source(fetch_batches(config, layout), root, config)

    stored = stored_folder(store, _key(layout, folder), build, layout.root)
    result = stored["result"]
    if result is None:  # fetched: the same summary the split gives for a folder it finds built
        import json

        manifest = json.loads(layout.manifest(config).read_text())
        result = {"manifest": str(layout.manifest(config)),
                  **{name: len(part["indices"]) for name, part in manifest["splits"].items()}, "reused": True}
    return {**result, "store": store.url(_key(layout, folder))}


def build_shards(config: PipelineConfig, layout: Layout) -> dict:
    from alexnet_tasks.data.shards import build_shards as write_shards
    from alexnet_tasks.data.stored import stored_folder

    store = _store(layout)
    folder = layout.shards(config)

    def build(root: Path):
        store.fetch_folder(_key(layout, layout.split(config)), layout.root)
        return write_shards(fetch_batches(config, layout), layout.manifest(config), root, config)

    stored = stored_folder(store, _key(layout, folder), build, layout.root)
    return {**(stored["result"] or {"shards_dir": str(folder), "reused": True}), "store": store.url(_key(layout, folder))}


def fetch_shards(config: PipelineConfig, layout: Layout) -> Path:
    """The run's shards in this host's cache, each file checked against the store's manifest."""
    return _store(layout).fetch_folder(_key(layout, layout.shards(config)), layout.root)


# --------------------------------------------------------------------------- a run's folder
def fetch_run(layout: Layout, run_id: str, names: list[str] | None = None, model: bool = True) -> Path:
    """This host's copy of ``runs/<run>/``: the named files, else every file but the checkpoints and the lease.

    Without ``model``, neither ``model.keras`` nor the TensorBoard logs (what the gate does not read).
    Files this host already holds in the store's version are not downloaded again.
    """
    store, run_dir = _store(layout), layout.run(run_id)
    if names is None:
        names = [name for name in store.list_files(_key(layout, run_dir))
                 if not name.startswith(f"{CHECKPOINTS}/") and name != LEASE
                 and (model or (name != MODEL and not name.startswith(f"{TENSORBOARD}/")))]
    store.fetch_files(_key(layout, run_dir), run_dir, names)
    return run_dir


def put_run(layout: Layout, run_id: str, names: list[str], last: str | None = None) -> list[str]:
    """Put the named files (or folders) of this host's ``runs/<run>/`` on the store, ``last`` after the others."""
    store, run_dir = _store(layout), layout.run(run_id)
    files = []
    for name in names:
        path = run_dir / name
        files += sorted(p.relative_to(run_dir).as_posix() for p in path.rglob("*") if p.is_file()) \
            if path.is_dir() else [name]
    uploaded = store.put_files(run_dir, _key(layout, run_dir), [name for name in files if name != last])
    if last is not None:
        uploaded += store.put_files(run_dir, _key(layout, run_dir), [last])
    return uploaded


def _committed_state(layout: Layout, run_id: str) -> str | None:
    """Make this host's copy of the run's committed state the store's: state.json, its checkpoint, the logs.

    Returns the name of the checkpoint the store's state names (None without a usable state).
    """
    import json

    store, run_dir = _store(layout), layout.run(run_id)
    key = _key(layout, run_dir)
    (run_dir / STATE).unlink(missing_ok=True)
    shutil.rmtree(run_dir / CHECKPOINTS, ignore_errors=True)
    data = store.read(f"{key}/{STATE}")
    if data is None:
        return None  # nothing committed anywhere: a fresh start
    try:
        checkpoint = json.loads(data)["checkpoint"]
    except (ValueError, KeyError, TypeError):
        log.warning("%s: unreadable; training starts over", store.url(f"{key}/{STATE}"))
        return None
    shutil.rmtree(run_dir / TENSORBOARD, ignore_errors=True)
    logs = [name for name in store.list_files(key) if name.startswith(f"{TENSORBOARD}/")]
    store.fetch_files(key, run_dir, [f"{CHECKPOINTS}/{checkpoint}", CONFIG, *logs])
    (run_dir / STATE).write_bytes(data)  # last: the state names a checkpoint that is here
    log.info("resuming from %s (checkpoint %s)", store.url(f"{key}/{STATE}"), checkpoint)
    return checkpoint


# --------------------------------------------------------------------------- training
def train(config: PipelineConfig, layout: Layout, run_id: str, *, devices: list[str] | None = None) -> dict:
    """``training.train.train`` under the run's lease, each epoch committed to the store.

    Raises ``store.LeaseHeldError`` while another live owner trains the run
    (a duplicate delivery; a retry takes the lease over once it expires) and
    ``store.LeaseLostError`` if this owner's lease was taken over (nothing is
    committed after that).
    """
    from alexnet_tasks.training.train import train as train_model

    store, run_dir = _store(layout), layout.run(run_id)
    shards = fetch_shards(config, layout)
    with Lease(store, f"{_key(layout, run_dir)}/{LEASE}", f"training {run_id}") as lease:
        if lease.took_over:
            log.warning("took over the lease of %s pid %s, silent for %s s", lease.took_over.get("host"),
                        lease.took_over.get("pid"), lease.took_over.get("silent_seconds"))
        previous = [name for name in [_committed_state(layout, run_id)] if name]
        key = _key(layout, run_dir)

        def commit(epochs_done: int, checkpoint: Path) -> None:
            lease.check()
            if epochs_done == 1:  # this attempt started over: an earlier attempt's logs are not this run's
                store.remove(f"{key}/{TENSORBOARD}")
            put_run(layout, run_id, [f"{CHECKPOINTS}/{checkpoint.name}", CONFIG, TENSORBOARD])
            lease.renew()  # still the owner a moment ago: only the owner commits
            put_run(layout, run_id, [STATE])
            for old in previous:  # the checkpoint the state named before this commit; never another owner's
                if old != checkpoint.name:
                    store.remove(f"{key}/{CHECKPOINTS}/{old}")
            previous[:] = [checkpoint.name]

        result = train_model(shards, run_dir, config, devices=devices, on_commit=commit)
        lease.renew()
        put_run(layout, run_id, [MODEL, HISTORY, CONFIG, TENSORBOARD, TRAIN_SUMMARY], last=TRAIN_SUMMARY)
    return {**result, "store": store.url(_key(layout, run_dir))}


# --------------------------------------------------------------------------- evaluation, gate, publish
def evaluate(config: PipelineConfig, layout: Layout, run_id: str) -> dict:
    from alexnet_tasks.evaluate import evaluate as evaluate_model

    run_dir = fetch_run(layout, run_id)
    result = evaluate_model(run_dir / MODEL, fetch_shards(config, layout), run_dir, config)
    if not (run_dir / PLAIN_PREDICTIONS).is_file():  # evaluated again without test-time augmentation
        _store(layout).remove(f"{_key(layout, run_dir)}/{PLAIN_PREDICTIONS}")
    put_run(layout, run_id, [PREDICTIONS, PLAIN_PREDICTIONS, CONFUSION_MATRIX, TEST_SAMPLES, TENSORBOARD, METRICS],
            last=METRICS)
    return result


def registry(layout: Layout, airflow: bool = False):
    """The registry of ``published/`` on the layout's store (``S3Store``), its lookup table in this host's cache."""
    from alexnet_tasks.release.registry import Registry, S3Store

    store = _store(layout)
    return Registry(store=S3Store(store.location, store.client, cache=layout.root))


def gate(config: PipelineConfig, layout: Layout, run_id: str) -> dict:
    from alexnet_tasks.release.gate import gate as decide

    run_dir = fetch_run(layout, run_id, model=False)
    decision = decide(fetch_shards(config, layout), layout.published, run_dir, config, run_id=run_id,
                      registry=registry(layout))
    put_run(layout, run_id, [DECISION])
    return decision


def publish(config: PipelineConfig, layout: Layout, run_id: str, **options) -> dict:
    """Publish as the gate decided, on the store; then retention on the store and in this host's cache.

    ``options`` are ``release.publish.publish``'s (``keep_runs``, ``dag_id``,
    ``sweep``). Its retention runs on this host's cache: the cache's copy of
    the run loses its checkpoints, and cached runs the index does not keep
    go. Then on the store the run's checkpoints are dropped and ``runs/`` is
    pruned beyond the newest ``keep_runs`` (``release.retention.prune_stored_runs``),
    the cached copies of the pruned runs with them. The result is publish's,
    with ``checkpoint_bytes_freed`` and ``pruned_runs`` of the store, and
    ``cache``: what retention freed and pruned in this host's cache.
    """
    from alexnet_tasks.release import retention
    from alexnet_tasks.release.publish import publish as publish_run

    from alexnet_tasks.layout import published_path

    store, run_dir = _store(layout), fetch_run(layout, run_id)
    # The copy is built from the run's folder, never from this cache's copy of an earlier publish (the gate
    # fetches champions without their model or logs): put_folder makes the store's copy hold exactly it.
    shutil.rmtree(layout.published / published_path(run_id), ignore_errors=True)
    published = registry(layout)
    result = publish_run(run_dir, layout.published, config, run_id=run_id, registry=published, **options)
    cache = {"checkpoint_bytes_freed": result["checkpoint_bytes_freed"], "pruned_runs": result["pruned_runs"]}
    freed = retention.drop_stored_checkpoints(store, run_dir.name)
    pruned = retention.prune_stored_runs(store, published, keep=options.get("keep_runs"), protect=(run_dir.name,),
                                         cached_runs=run_dir.parent)
    return {**result, "checkpoint_bytes_freed": freed, "pruned_runs": pruned, "cache": cache}


def promote(layout: Layout, **request) -> dict:
    """``release.promote.promote_run`` on the store's ``published/``: the champion moves by compare-and-swap there."""
    from alexnet_tasks.release.promote import promote_run

    return promote_run(layout.published, registry=registry(layout), **request)


# --------------------------------------------------------------------------- approval
def fetch_decision(layout: Layout, run_id: str) -> Path:
    """This host's ``runs/<run>/`` with the gate's ``decision.json`` as the store has it (none if it has none)."""
    run_dir = layout.run(run_id)
    (run_dir / DECISION).unlink(missing_ok=True)
    return fetch_run(layout, run_id, [DECISION])


# --------------------------------------------------------------------------- predict
def fetch_inbox(layout: Layout) -> Path:
    """This host's copy of the store's ``inbox/``: every object fetched, the files the store no longer has removed.

    Raises ``MissingInputError`` naming its URL when the store has nothing under ``inbox/``.
    """
    from alexnet_tasks.errors import MissingInputError

    store, folder = _store(layout), layout.inbox
    key = _key(layout, folder)
    names = store.list_files(key)
    if not names:
        raise MissingInputError(f"{store.url(key)}: nothing on the store to score (expected PNG or JPEG images "
                                f"under it, or an input folder)")
    if folder.is_dir():
        for path in folder.rglob("*"):
            if path.is_file() and path.relative_to(folder).as_posix() not in names:
                path.unlink()
    store.fetch_files(key, folder, names)
    return folder


def predict(layout: Layout, run_id: str, input_folder: str | None = None, output_dir: Path | None = None) -> dict:
    """``serving.predict.predict`` with the store's champion; the inbox and the predictions on the store by default.

    Without ``input_folder`` the store's ``inbox/`` is fetched into this
    host's cache and scored (the output names its files by their URLs);
    without ``output_dir`` the predictions are written to the cache's
    ``scored/<run>/`` and put on the store there (``summary.json`` last),
    and ``predictions`` and ``summary`` in the result are their URLs.
    """
    from alexnet_tasks.serving.predict import PREDICTIONS_FILE, SUMMARY_FILE
    from alexnet_tasks.serving.predict import predict as score

    store = _store(layout)
    input_name = None
    if not input_folder:
        input_folder, input_name = str(fetch_inbox(layout)), store.url(_key(layout, layout.inbox))
    output = Path(output_dir) if output_dir else layout.scored(run_id)
    summary = score(input_folder, layout.published, output, registry=registry(layout), input_name=input_name)
    if output_dir:
        return summary
    key = _key(layout, output)
    store.put_files(output, key, [PREDICTIONS_FILE, SUMMARY_FILE])
    return {**summary, "predictions": store.url(f"{key}/{PREDICTIONS_FILE}"),
            "summary": store.url(f"{key}/{SUMMARY_FILE}")}


# --------------------------------------------------------------------------- sweeps
def select_trial(trials: list[dict], layout: Layout, *, sweep_run_id: str, dag_id: str | None = None) -> dict:
    """``release.sweeps.select_trial`` on what the store has of each trial; the sweep's record written there.

    Each trial's ``train_summary.json`` and ``history.json`` are the store's
    (this host's copies are dropped first, so a trial that finished nowhere
    reads as unfinished here too).
    """
    from alexnet_tasks.release.sweeps import select_trial as choose
    from alexnet_tasks.sweeps import trial_run_id

    for trial in trials:
        run_id = trial_run_id(sweep_run_id, trial["index"])
        for name in (TRAIN_SUMMARY, HISTORY):
            (layout.run(run_id) / name).unlink(missing_ok=True)
        fetch_run(layout, run_id, [TRAIN_SUMMARY, HISTORY])
    return choose(trials, layout, sweep_run_id=sweep_run_id, dag_id=dag_id, registry=registry(layout))
