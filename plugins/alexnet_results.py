"""The published AlexNet runs inside the Airflow UI.

An Airflow 3 plugin with:

- a FastAPI app under ``/alexnet`` serving server-rendered pages (Jinja2,
  inline SVG charts, relative URLs only, so it works under an
  ``[api] base_url`` sub-path; no JavaScript but the few inline lines of the
  promote page and the shared script that opens links to Airflow's own pages
  in the whole window):
  ``runs`` (the published runs, newest first, a page at a time:
  ``?page=2&size=50``, filtered with ``?blessed=true``, ``?recipe=fast`` and
  ``?sweep=<sweep run id>``),
  ``runs/<run_id>`` (one run's results, its approval and a "make champion"
  link to the promote page), ``promote?run=<run_id>`` (a form that triggers
  ``alexnet_cifar10_promote`` with that run and a reason: its inline script
  posts to Airflow's own REST API, ``POST api/v2/dags/<dag_id>/dagRuns``, with
  the UI's login cookie; the plugin has no POST route of its own),
  ``runs/<run_id>/files/<name>`` (a
  named artifact of that run), ``history`` (every change of champion, newest
  first, from ``published/promotions.jsonl``), ``compare?a=<run_id>&b=<run_id>`` (two runs
  side by side), ``sweeps/<run_id>`` (a sweep's trials, best
  first, with a chart of validation accuracy against each swept setting) and
  ``dags/<dag_id>/runs/<run_id>`` (the "Results" tab of a DAG run: the run's
  results for ``alexnet_cifar10``, the sweep page for ``alexnet_cifar10_sweep``);
- a Browse nav entry "AlexNet runs" and a "Results" tab on DAG runs (both
  external views, shown by Airflow's UI in an iframe);
- an extra link "AlexNet results" on the train, evaluate and publish task
  instances of ``alexnet_cifar10``.

Every route requires a logged-in Airflow user allowed to read the DAG's runs
(Airflow's own ``get_user`` and ``requires_access_dag``). What a page shows
comes from ``alexnet_tasks.ui`` (the view model and the charts, on the
registry of ``published/``): a run is found through its index entry and only
its named artifacts are served (on a local root only files resolved inside
``published/``); anything else is a 404.

``$ALEXNET_ARTIFACTS`` is a local folder or an object store
(``s3://bucket/prefix``). Each request reads through one registry
(``alexnet_tasks.ui.runs.published_registry``); on a store with the
credentials of the Airflow connection ``$ALEXNET_ARTIFACTS_CONN_ID`` (default
``aws_default``), an artifact streamed from its object.

Workers import plugins for every task, so this module imports no TensorFlow,
NumPy, matplotlib or boto3, and Airflow's API-server security helpers only
when a request arrives.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from urllib.parse import quote, urlencode

import jinja2
from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.responses import FileResponse, HTMLResponse, Response, StreamingResponse

from airflow.plugins_manager import AirflowPlugin
from airflow.providers.standard.decorators.python import _PythonDecoratedOperator
from airflow.sdk import BaseOperatorLink

from alexnet_tasks.layout import CONFUSION_MATRIX, MODEL
from alexnet_tasks.release.registry import DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE, Registry
from alexnet_tasks.ui.charts import accuracy_over_time, compared_curves, training_curves
from alexnet_tasks.ui.compare import compare_runs
from alexnet_tasks.ui.runs import (
    ARTIFACTS,
    RunView,
    artifact_names,
    artifact_path,
    champion_id,
    find_run,
    is_local,
    load_details,
    open_stored_artifact,
    published_location,
    published_registry,
    runs_page,
)
from alexnet_tasks.ui.sweeps import load_sweep

log = logging.getLogger(__name__)

DAG_ID = "alexnet_cifar10"
PROMOTE_DAG_ID = "alexnet_cifar10_promote"  # dags/alexnet_cifar10_promote.py: makes a published run the champion
SWEEP_DAG_ID = "alexnet_cifar10_sweep"
URL_PREFIX = "/alexnet"  # where Airflow mounts the app
LIST_ROUTE = "alexnet-runs"  # UI route of the nav entry: /plugin/alexnet-runs
TAB_ROUTE = "alexnet-results"  # UI route of the DAG run tab: /dags/<dag>/runs/<run>/plugin/alexnet-results
LINKED_TASKS = ("train", "evaluate", "publish")
TENSORBOARD_ENV = "ALEXNET_TENSORBOARD_URL"
DEFAULT_TENSORBOARD = "http://127.0.0.1:6006"
TEMPLATES = Path(__file__).resolve().parent / "templates"
CHUNK = 1 << 20  # bytes of an artifact streamed from an object store at a time


# --------------------------------------------------------------------------- pages
_environment = jinja2.Environment(
    loader=jinja2.FileSystemLoader(str(TEMPLATES)),
    autoescape=jinja2.select_autoescape(["html"]),
    undefined=jinja2.StrictUndefined,
)
_environment.filters["percent"] = lambda value: "—" if value is None else f"{value:.2%}"
_environment.filters["number"] = lambda value, digits=4: "—" if value is None else f"{value:.{digits}f}"
_environment.filters["dash"] = lambda value: "—" if value is None or value == "" else value
_environment.filters["setting"] = lambda value: "—" if value is None else json.dumps(value) if not isinstance(
    value, str) else value


def tensorboard_url() -> str:
    return os.environ.get(TENSORBOARD_ENV) or DEFAULT_TENSORBOARD


def _page(name: str, status_code: int = 200, **context) -> HTMLResponse:
    text = _environment.get_template(name).render(dag_id=DAG_ID, **context)
    return HTMLResponse(text, status_code=status_code)


def _message(title: str, text: str, plugin_root: str, status_code: int) -> HTMLResponse:
    return _page("alexnet_message.html", status_code, title=title, text=text, plugin_root=plugin_root,
                 airflow_root=plugin_root + "../")


def _run_page(registry: Registry, run: RunView, plugin_root: str) -> HTMLResponse:
    load_details(registry, run)
    loss_chart, accuracy_chart = training_curves(run.history)
    per_class = run.metrics.get("per_class_accuracy")
    present = artifact_names(registry, run)
    files = {name: name in present for name in ARTIFACTS}
    approval = run.entry.get("approval")
    champion = champion_id(registry)
    return _page(
        "alexnet_run.html", run=run, plugin_root=plugin_root, airflow_root=plugin_root + "../",
        files=files, loss_chart=loss_chart, accuracy_chart=accuracy_chart,
        per_class=per_class if isinstance(per_class, dict) else {},
        tensorboard=tensorboard_url(), folder_name=run.folder.name if run.folder else None,
        approval=approval if isinstance(approval, dict) else None, promote_dag=PROMOTE_DAG_ID,
        promote=promote_link(run.run_id),
        compare=compare_link(run.run_id, champion) if champion and champion != run.run_id else None,
    )


def compare_link(first: str, second: str) -> str:
    """The compare page of two runs, relative to the plugin's root: ``compare?a=<first>&b=<second>``."""
    return "compare?" + urlencode({"a": first, "b": second})


def promote_link(run_id: str) -> str:
    """The promote page of a run, relative to the plugin's root: ``promote?run=<run_id>``."""
    return "promote?" + urlencode({"run": run_id})


def trigger_path(dag_id: str) -> str:
    """Airflow's REST endpoint that triggers ``dag_id``, relative to Airflow's root: ``api/v2/dags/<dag_id>/dagRuns``."""
    return f"api/v2/dags/{quote(dag_id, safe='')}/dagRuns"


async def require_run_reader(request: Request) -> None:
    """401/403 unless the caller is a logged-in Airflow user who may read the DAG's runs.

    Airflow's helpers take the JWT from ``Authorization: Bearer`` or the UI's
    ``_token`` cookie; they are imported here, on the API server, not when a
    worker loads the plugin.
    """
    from airflow.api_fastapi.auth.managers.models.resource_details import DagAccessEntity
    from airflow.api_fastapi.core_api.security import bearer_scheme, get_user, requires_access_dag

    credentials = await bearer_scheme(request)
    user = await get_user(request, _oauth_token=None, bearer_credentials=credentials)
    requires_access_dag("GET", DagAccessEntity.RUN, param_dag_id=DAG_ID)(request, user)


app = FastAPI(
    title="AlexNet runs",
    dependencies=[Depends(require_run_reader)],
    docs_url=None,
    redoc_url=None,
    openapi_url=None,
)


def _list_link(page: int, size: int, blessed: bool, recipe: str | None, sweep: str | None = None) -> str:
    """A relative link to a page of the list with the same filters."""
    query = {"page": page}
    if size != DEFAULT_PAGE_SIZE:
        query["size"] = size
    if blessed:
        query["blessed"] = "true"
    if recipe:
        query["recipe"] = recipe
    if sweep:
        query["sweep"] = sweep
    return "runs?" + urlencode(query)


@app.get("/runs", response_class=HTMLResponse)
def list_page(page: int = 1, size: int = DEFAULT_PAGE_SIZE, blessed: bool = False,
              recipe: str | None = None, sweep: str | None = None) -> HTMLResponse:
    if page < 1 or not 1 <= size <= MAX_PAGE_SIZE:
        return _message("No such page", f"page must be 1 or more and size 1 to {MAX_PAGE_SIZE}.", "", 400)
    registry = published_registry()
    recipe, sweep = recipe or None, sweep or None
    runs, found = runs_page(registry, (page - 1) * size, size, blessed=True if blessed else None, recipe=recipe,
                            sweep=sweep)
    pages = max(1, -(-found.total // size))
    # The compare form starts on the newest run that is not the champion (A) and the champion (B).
    others = [run.run_id for run in runs if not run.champion]
    champions = [run.run_id for run in runs if run.champion]
    picked = (others + champions + [None])[0], (champions + others[1:] + [None])[0]
    return _page(
        "alexnet_runs.html", runs=runs, chart=accuracy_over_time(runs), plugin_root="", airflow_root="../",
        root=published_location(registry), page=page, pages=pages, picked=picked, total=found.total,
        blessed=blessed, recipe=recipe, sweep=sweep, recipes=registry.values("recipe"),
        newer=_list_link(page - 1, size, blessed, recipe, sweep) if found.has_newer else None,
        older=_list_link(page + 1, size, blessed, recipe, sweep) if found.has_older else None,
    )


def _sweep_page(sweep_id: str, plugin_root: str) -> HTMLResponse:
    sweep = load_sweep(published_registry(), sweep_id)
    if sweep is None:
        return _message(
            "No sweep results yet",
            f"Sweep run {sweep_id} has no record yet: it appears once its select task has run.", plugin_root, 404)
    return _page("alexnet_sweep.html", sweep=sweep, plugin_root=plugin_root, airflow_root=plugin_root + "../",
                 sweep_dag_id=SWEEP_DAG_ID, runs_link=plugin_root + _list_link(1, DEFAULT_PAGE_SIZE, False, None,
                                                                              sweep_id))


@app.get("/sweeps/{run_id}", response_class=HTMLResponse)
def sweep_page(run_id: str) -> HTMLResponse:
    return _sweep_page(run_id, "../")


@app.get("/runs/{run_id}", response_class=HTMLResponse)
def run_page(run_id: str) -> HTMLResponse:
    registry = published_registry()
    run = find_run(registry, run_id)
    if run is None:
        return _message("Unknown run", f"No published run {run_id!r} in the index.", "../", 404)
    return _run_page(registry, run, "../")


@app.get("/history", response_class=HTMLResponse)
def history_page() -> HTMLResponse:
    """Every change of champion, newest first: when, from which run to which, why, who, which Airflow run."""
    registry = published_registry()
    return _page("alexnet_history.html", changes=registry.history(), plugin_root="", airflow_root="../",
                 root=published_location(registry), quote=lambda text: quote(text, safe=""))


@app.get("/compare", response_class=HTMLResponse)
def compare_page(a: str = "", b: str = "") -> HTMLResponse:
    if not a or not b:
        return _message("Pick two runs", "The compare page needs two runs: compare?a=<run id>&b=<run id>.", "", 400)
    registry = published_registry()
    comparison = compare_runs(registry, a, b)
    if comparison is None:
        unknown = [run_id for run_id in (a, b) if find_run(registry, run_id) is None]
        return _message("Unknown run", f"No published run {unknown[0]!r} in the index.", "", 404)
    first, second = comparison.first, comparison.second
    loss_chart, accuracy_chart = compared_curves(first.history, second.history)
    matrices = [(label, run, CONFUSION_MATRIX in artifact_names(registry, run))
                for label, run in (("A", first), ("B", second))]
    return _page(
        "alexnet_compare.html", plugin_root="", airflow_root="../", first=first, second=second,
        params=comparison.params, headline=comparison.headline, per_class=comparison.per_class,
        paired=comparison.paired, paired_missing=comparison.paired_missing, compared_as=comparison.compared_as,
        loss_chart=loss_chart, accuracy_chart=accuracy_chart, matrices=matrices, swap=compare_link(b, a),
    )


@app.get("/promote", response_class=HTMLResponse)
def promote_page(run: str = "") -> HTMLResponse:
    """A form that triggers the promote DAG with ``run`` and a reason, through Airflow's REST API.

    400 without ``run``, 404 naming it when the index has no such run. The
    page itself only reads: its inline script posts ``{"logical_date": null,
    "conf": {"run_id": ..., "reason": ...}}`` to ``../api/v2/dags/<promote
    DAG>/dagRuns`` (the API server takes the UI's ``_token`` cookie, and checks
    the user may trigger that DAG), then shows the created DAG run with a link
    to its page, or the API's error.
    """
    if not run:
        return _message("Pick a run", "The promote page needs a run: promote?run=<run id>.", "", 400)
    registry = published_registry()
    candidate = find_run(registry, run)
    if candidate is None:
        return _message("Unknown run", f"No published run {run!r} in the index.", "", 404)
    champion = champion_id(registry)
    champion_run = find_run(registry, champion) if champion else None
    return _page(
        "alexnet_promote.html", plugin_root="", airflow_root="../", run=candidate, champion=champion_run,
        has_model=MODEL in artifact_names(registry, candidate), promote_dag=PROMOTE_DAG_ID,
        trigger_url="../" + trigger_path(PROMOTE_DAG_ID),
    )


@app.get("/runs/{run_id}/files/{name}")
def run_file(run_id: str, name: str) -> Response:
    """A named artifact of an indexed run: a local file, or streamed from its object on a store; else 404."""
    registry = published_registry()
    run = find_run(registry, run_id)
    download = name == MODEL
    if is_local(registry):
        path = artifact_path(run, registry.store.root, name) if run is not None else None
        if path is None:
            raise HTTPException(404, "Not Found")
        return FileResponse(path, media_type=ARTIFACTS[name], filename=name if download else None,
                            content_disposition_type="attachment" if download else "inline")
    stored = open_stored_artifact(registry, run, name) if run is not None else None
    if stored is None:
        raise HTTPException(404, "Not Found")

    def chunks():
        try:
            yield from stored.body.iter_chunks(CHUNK)
        finally:
            stored.body.close()

    headers = {"Content-Length": str(stored.size)}
    if download:
        headers["Content-Disposition"] = f'attachment; filename="{name}"'
    return StreamingResponse(chunks(), media_type=ARTIFACTS[name], headers=headers)


@app.get("/dags/{dag_id}/runs/{run_id}", response_class=HTMLResponse)
def run_tab(dag_id: str, run_id: str) -> HTMLResponse:
    plugin_root = "../../../"
    if dag_id == SWEEP_DAG_ID:
        return _sweep_page(run_id, plugin_root)
    if dag_id != DAG_ID:
        return _message("No AlexNet results",
                        f"Results are shown for runs of {DAG_ID} and {SWEEP_DAG_ID}; {dag_id} is another DAG.",
                        plugin_root, 200)
    registry = published_registry()
    run = find_run(registry, run_id)
    if run is None:
        return _message(
            "No results yet",
            f"Run {run_id} has not published results (yet): they appear here once its publish task has succeeded.",
            plugin_root, 404,
        )
    return _run_page(registry, run, plugin_root)


# --------------------------------------------------------------------------- plugin
class AlexNetResultsLink(BaseOperatorLink):
    """Extra link on train, evaluate and publish of alexnet_cifar10: the DAG run's Results tab."""

    name = "AlexNet results"
    operators = [_PythonDecoratedOperator]

    def get_link(self, operator, *, ti_key) -> str:
        if ti_key.dag_id != DAG_ID or ti_key.task_id not in LINKED_TASKS:
            return ""
        return f"dags/{quote(DAG_ID, safe='')}/runs/{quote(ti_key.run_id, safe='')}/plugin/{TAB_ROUTE}"


class AlexNetResultsPlugin(AirflowPlugin):
    name = "alexnet_results"
    fastapi_apps = [{"app": app, "url_prefix": URL_PREFIX, "name": "AlexNet runs"}]
    external_views = [
        {
            "name": "AlexNet runs",
            "href": "alexnet/runs",
            "category": "browse",
            "destination": "nav",
            "url_route": LIST_ROUTE,
        },
        {
            "name": "Results",
            "href": "alexnet/dags/{DAG_ID}/runs/{RUN_ID}",
            "destination": "dag_run",
            "url_route": TAB_ROUTE,
        },
    ]
    operator_extra_links = [AlexNetResultsLink()]
