"""The published AlexNet runs inside the Airflow UI.

An Airflow 3 plugin with:

- a FastAPI app under ``/alexnet`` serving server-rendered pages (Jinja2,
  inline SVG charts, no JavaScript, relative URLs only, so it works under an
  ``[api] base_url`` sub-path):
  ``runs`` (every run of ``published/index.jsonl``, newest first),
  ``runs/<run_id>`` (one run's results), ``runs/<run_id>/files/<name>`` (a
  named artifact of that run) and ``dags/<dag_id>/runs/<run_id>`` (the
  "Results" tab of a DAG run);
- a Browse nav entry "AlexNet runs" and a "Results" tab on DAG runs (both
  external views, shown by Airflow's UI in an iframe);
- an extra link "AlexNet results" on the train, evaluate and publish task
  instances of ``alexnet_cifar10``.

Every route requires a logged-in Airflow user allowed to read the DAG's runs
(Airflow's own ``get_user`` and ``requires_access_dag``). A run is found
through its index line's ``path`` and only named artifacts resolved inside
``published/`` are served; anything else is a 404.

Workers import plugins for every task, so this module imports no TensorFlow,
NumPy or matplotlib, and Airflow's API-server security helpers only when a
request arrives.
"""

from __future__ import annotations

import html
import json
import logging
import math
import os
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any
from urllib.parse import quote

import jinja2
from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.responses import FileResponse, HTMLResponse
from markupsafe import Markup

from airflow.plugins_manager import AirflowPlugin
from airflow.providers.standard.decorators.python import _PythonDecoratedOperator
from airflow.sdk import BaseOperatorLink

log = logging.getLogger(__name__)

DAG_ID = "alexnet_cifar10"
URL_PREFIX = "/alexnet"  # where Airflow mounts the app
LIST_ROUTE = "alexnet-runs"  # UI route of the nav entry: /plugin/alexnet-runs
TAB_ROUTE = "alexnet-results"  # UI route of the DAG run tab: /dags/<dag>/runs/<run>/plugin/alexnet-results
LINKED_TASKS = ("train", "evaluate", "publish")
TENSORBOARD_ENV = "ALEXNET_TENSORBOARD_URL"
DEFAULT_TENSORBOARD = "http://127.0.0.1:6006"
# The files of a published run that may be served, and their media types.
ARTIFACTS = {
    "confusion_matrix.png": "image/png",
    "test_samples.png": "image/png",
    "metrics.json": "application/json",
    "config.json": "application/json",
    "history.json": "application/json",
    "decision.json": "application/json",
    "model.keras": "application/octet-stream",
}
TEMPLATES = Path(__file__).resolve().parent / "templates"


# --------------------------------------------------------------------------- reading the published runs
def published_root() -> Path:
    """``$ALEXNET_ARTIFACTS/published`` (default ``~/alexnet-artifacts``), as alexnet_tasks.config has it."""
    root = Path(os.environ.get("ALEXNET_ARTIFACTS") or "~/alexnet-artifacts").expanduser().resolve()
    return root / "published"


def read_index(root: Path) -> list[dict]:
    """The index lines that name a run and its folder; a malformed line is logged and skipped."""
    path = root / "index.jsonl"
    if not path.is_file():
        return []
    lines = []
    for number, text in enumerate(path.read_text().splitlines(), start=1):
        if not text.strip():
            continue
        try:
            line = json.loads(text)
        except ValueError as error:
            log.warning("%s:%d: not JSON (%s); skipped", path, number, error)
            continue
        if not isinstance(line, dict) or not isinstance(line.get("run_id"), str) or not isinstance(line.get("path"), str):
            log.warning("%s:%d: no run_id or path; skipped", path, number)
            continue
        lines.append(line)
    return lines


def _inside(root: Path, candidate: Path) -> Path | None:
    """``candidate`` with every link resolved, or None when that leaves ``root``."""
    resolved = candidate.resolve()
    return resolved if resolved != root and resolved.is_relative_to(root) else None


def run_folder(root: Path, line: dict) -> Path | None:
    """The run folder an index line points to, if it is a folder inside ``root``."""
    relative = Path(line["path"])
    if relative.is_absolute():
        return None
    folder = _inside(root.resolve(), root / relative)
    return folder if folder is not None and folder.is_dir() else None


def artifact_path(root: Path, line: dict, name: str) -> Path | None:
    """A named artifact of a run, if it exists as a file inside ``root``."""
    folder = run_folder(root, line)
    if name not in ARTIFACTS or folder is None:
        return None
    path = _inside(root.resolve(), folder / name)
    return path if path is not None and path.is_file() else None


def champion_folder(root: Path) -> Path | None:
    """The folder ``published/latest`` points to."""
    latest = root / "latest"
    return _inside(root.resolve(), latest) if latest.exists() else None


def _load_json(path: Path | None) -> Any:
    if path is None:
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as error:
        log.warning("%s: unreadable (%s)", path, error)
        return None


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def _first(*values: Any) -> Any:
    return next((value for value in values if value is not None), None)


def _setting(config: Any, name: str) -> Any:
    """A setting from a resolved config: flat, or under "pipeline" / "train" as config.json has them."""
    if not isinstance(config, dict):
        return None
    if name in config and not isinstance(config[name], dict):
        return config[name]
    return _first(*(_setting(config.get(part), name) for part in ("pipeline", "train")))


def describe_devices(devices: Any) -> str | None:
    """A short text for the index's ``devices`` field, whatever its shape."""
    if devices is None or devices == "":
        return None
    if isinstance(devices, str):
        return devices
    if isinstance(devices, list):
        return ", ".join(filter(None, (describe_devices(item) for item in devices))) or None
    if isinstance(devices, dict):
        count, kind = devices.get("count"), devices.get("name") or devices.get("kind") or devices.get("type")
        if count is not None and kind:
            return f"{count} x {kind}"
        return ", ".join(f"{key}: {value}" for key, value in devices.items())
    return str(devices)


def _duration(seconds: float | None) -> str | None:
    if seconds is None:
        return None
    minutes, rest = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min" if hours else f"{minutes} min {rest:02d} s" if minutes else f"{rest} s"


@dataclass
class Run:
    """One published run: its index line, its folder and what its files say."""

    line: dict  # the index line
    folder: Path | None  # the run folder inside published/, None when missing or outside
    champion: bool  # published/latest points here
    metrics: dict = field(default_factory=dict)  # metrics.json
    config: dict = field(default_factory=dict)  # the index line's resolved config, else config.json
    history: list = field(default_factory=list)  # history.json: one dict per epoch
    decision: dict | None = None  # decision.json of the gate, when present

    @property
    def run_id(self) -> str:
        return self.line["run_id"]

    @property
    def quoted(self) -> str:
        return quote(self.run_id, safe="")

    @property
    def published_at(self) -> str:
        return str(self.line.get("published_at") or "")

    @property
    def test_accuracy(self) -> float | None:
        return _number(_first(self.line.get("test_accuracy"), self.metrics.get("test_accuracy")))

    @property
    def test_time_augmentation(self) -> str:
        """The views the headline accuracy averaged: none (runs from before it existed too), flip, flip_shift."""
        return str(_first(self.line.get("test_time_augmentation"), self.metrics.get("test_time_augmentation"))
                   or "none")

    @property
    def test_accuracy_plain(self) -> float | None:
        """The accuracy of the image alone (the headline one when there was no test-time augmentation)."""
        if self.test_time_augmentation == "none":
            return self.test_accuracy
        return _number(_first(self.line.get("test_accuracy_plain"), self.metrics.get("test_accuracy_plain")))

    @property
    def test_loss(self) -> float | None:
        return _number(_first(self.line.get("test_loss"), self.metrics.get("test_loss")))

    @property
    def val_accuracy(self) -> float | None:
        last = self.history[-1] if self.history and isinstance(self.history[-1], dict) else {}
        return _number(_first(self.line.get("val_accuracy"), self.line.get("validation_accuracy"), last.get("val_accuracy")))

    @property
    def epochs_run(self) -> int | None:
        return _first(self.line.get("epochs_run"), len(self.history) if self.history else None)

    @property
    def epochs_planned(self) -> int | None:
        return _first(self.line.get("epochs_planned"), _setting(self.config, "epochs"))

    @property
    def epochs(self) -> str | None:
        run, planned = self.epochs_run, self.epochs_planned
        if run is None:
            return None if planned is None else f"? / {planned}"
        return f"{run} / {planned}" if planned is not None and planned != run else str(run)

    @property
    def recipe(self) -> str | None:
        return _setting(self.config, "recipe")

    @property
    def image_size(self) -> int | None:
        return _setting(self.config, "image_size")

    @property
    def seconds(self) -> float | None:
        spent = [entry.get("epoch_seconds") for entry in self.history if isinstance(entry, dict)]
        summed = sum(value for value in spent if _number(value) is not None) if spent else None
        return _number(_first(self.line.get("seconds"), summed))

    @property
    def training_time(self) -> str | None:
        return _duration(self.seconds)

    @property
    def devices(self) -> str | None:
        return describe_devices(_first(self.line.get("devices"), self.metrics.get("devices")))

    @property
    def fingerprint(self) -> str | None:
        return _first(self.line.get("fingerprint"), self.metrics.get("fingerprint"))

    @property
    def truncated(self) -> bool | None:
        return _first(self.line.get("truncated"), self.metrics.get("truncated"))

    @property
    def blessed(self) -> bool | None:
        return _first(self.line.get("blessed"), (self.decision or {}).get("blessed"))

    @property
    def reason(self) -> str | None:
        return _first(self.line.get("blessed_reason"), self.line.get("reason"), (self.decision or {}).get("reason"))


def load_runs(root: Path, details: bool = True) -> list[Run]:
    """Every indexed run, newest first (by ``published_at``, then index order)."""
    champion = champion_folder(root)
    runs = []
    for line in read_index(root):
        folder = run_folder(root, line)
        run = Run(line=line, folder=folder, champion=folder is not None and folder == champion)
        if details:
            _load_details(root, run)
        runs.append(run)
    order = {id(run): position for position, run in enumerate(runs)}
    runs.sort(key=lambda run: (run.published_at, order[id(run)]), reverse=True)
    return runs


def _load_details(root: Path, run: Run) -> None:
    load = lambda name: _load_json(artifact_path(root, run.line, name))  # noqa: E731
    metrics, config, history = load("metrics.json"), load("config.json"), load("history.json")
    run.metrics = metrics if isinstance(metrics, dict) else {}
    line_config = run.line.get("config")
    run.config = line_config if isinstance(line_config, dict) else config if isinstance(config, dict) else {}
    run.history = history if isinstance(history, list) else []
    decision = load("decision.json")
    run.decision = decision if isinstance(decision, dict) else None


def find_run(root: Path, run_id: str) -> Run | None:
    return next((run for run in load_runs(root, details=False) if run.run_id == run_id), None)


# --------------------------------------------------------------------------- charts (inline SVG)
PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728")


def _ticks(low: float, high: float, count: int = 5) -> list[float]:
    if high <= low:
        return [low]
    step = (high - low) / (count - 1)
    return [low + step * index for index in range(count)]


def line_chart(
    series: list[tuple[str, list[tuple[float, float]]]],
    title: str,
    x_label: str,
    y_label: str,
    x_format=lambda value: f"{value:g}",
    y_format=lambda value: f"{value:.2f}",
    css_class: str = "chart",
    highlight: int | None = None,
) -> Markup:
    """An SVG line chart of ``(label, [(x, y), ...])`` series; points with a None y are left out."""
    width, height, left, right, top, bottom = 560, 290, 58, 16, 40, 46
    points = [(x, y) for _, data in series for x, y in data if y is not None]
    if not points:
        return Markup(f'<p class="empty">No data for {html.escape(title)}.</p>')
    xs, ys = [x for x, _ in points], [y for _, y in points]
    x_low, x_high = min(xs), max(xs)
    if x_high == x_low:
        x_low, x_high = x_low - 1, x_high + 1
    y_low, y_high = min(ys), max(ys)
    pad = (y_high - y_low) * 0.08 or max(abs(y_high) * 0.05, 0.05)
    y_low, y_high = y_low - pad, y_high + pad
    plot_w, plot_h = width - left - right, height - top - bottom

    def sx(x):
        return left + (x - x_low) / (x_high - x_low) * plot_w

    def sy(y):
        return top + (y_high - y) / (y_high - y_low) * plot_h

    parts = [
        f'<svg class="{css_class}" viewBox="0 0 {width} {height}" width="{width}" height="{height}" '
        f'role="img" aria-label="{html.escape(title)}" xmlns="http://www.w3.org/2000/svg">',
        f'<title>{html.escape(title)}</title>',
        f'<text x="{left}" y="18" class="title">{html.escape(title)}</text>',
        f'<rect x="{left}" y="{top}" width="{plot_w}" height="{plot_h}" class="frame"/>',
    ]
    for y in _ticks(y_low, y_high):
        parts.append(f'<line x1="{left}" x2="{left + plot_w}" y1="{sy(y):.1f}" y2="{sy(y):.1f}" class="grid"/>')
        parts.append(f'<text x="{left - 6}" y="{sy(y) + 4:.1f}" class="tick" text-anchor="end">{html.escape(y_format(y))}</text>')
    unique_x = sorted(set(xs))
    x_ticks = unique_x if len(unique_x) <= 6 else _ticks(x_low, x_high, 5)
    for x in x_ticks:
        anchor = "start" if x == x_low and len(x_ticks) > 1 else "end" if x == x_high and len(x_ticks) > 1 else "middle"
        parts.append(
            f'<text x="{sx(x):.1f}" y="{top + plot_h + 16}" class="tick" text-anchor="{anchor}">{html.escape(x_format(x))}</text>'
        )
    parts.append(f'<text x="{left + plot_w / 2:.1f}" y="{height - 8}" class="label" text-anchor="middle">{html.escape(x_label)}</text>')
    parts.append(
        f'<text x="14" y="{top + plot_h / 2:.1f}" class="label" text-anchor="middle" '
        f'transform="rotate(-90 14 {top + plot_h / 2:.1f})">{html.escape(y_label)}</text>'
    )
    for number, (label, data) in enumerate(series):
        color = PALETTE[number % len(PALETTE)]
        shown = [(x, y) for x, y in data if y is not None]
        if not shown:
            continue
        coordinates = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in shown)
        parts.append(
            f'<polyline class="series" data-series="{html.escape(label)}" points="{coordinates}" '
            f'fill="none" stroke="{color}" stroke-width="2"/>'
        )
        for index, (x, y) in enumerate(shown):
            radius = 5 if highlight is not None and index == highlight else 3
            parts.append(
                f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="{radius}" fill="{color}">'
                f"<title>{html.escape(label)}: {html.escape(y_format(y))} at {html.escape(x_format(x))}</title></circle>"
            )
        legend_x = left + 150 * number  # one row of legend entries between the title and the plot
        parts.append(f'<line x1="{legend_x}" x2="{legend_x + 18}" y1="28" y2="28" stroke="{color}" stroke-width="3"/>')
        parts.append(f'<text x="{legend_x + 24}" y="32" class="legend">{html.escape(label)}</text>')
    parts.append("</svg>")
    return Markup("".join(parts))


def _timestamp(text: str) -> float | None:
    try:
        return datetime.fromisoformat(text).timestamp()
    except (TypeError, ValueError):
        return None


def accuracy_over_time(runs: list[Run]) -> Markup:
    """Test accuracy of every run against the time it was published."""
    ordered = [run for run in reversed(runs) if _timestamp(run.published_at) is not None]
    data = [(_timestamp(run.published_at), run.test_accuracy) for run in ordered]
    champion = next((index for index, run in enumerate(ordered) if run.champion), None)
    return line_chart(
        [("test accuracy", data)], "Test accuracy of the published runs", "published (UTC)", "test accuracy",
        x_format=lambda value: datetime.fromtimestamp(value, timezone.utc).strftime("%m-%d %H:%M"),
        y_format=lambda value: f"{value:.0%}" if value >= 0.1 else f"{value:.1%}",
        css_class="chart timeline", highlight=champion,
    )


def training_curves(history: list) -> tuple[Markup, Markup]:
    """Loss and accuracy per epoch, training and validation."""
    entries = [entry for entry in history if isinstance(entry, dict)]

    def series(key):
        return [(float(entry.get("epoch", index + 1)), _number(entry.get(key))) for index, entry in enumerate(entries)]

    loss = line_chart(
        [("train loss", series("loss")), ("validation loss", series("val_loss"))],
        "Loss per epoch", "epoch", "loss", css_class="chart curves",
    )
    accuracy = line_chart(
        [("train accuracy", series("accuracy")), ("validation accuracy", series("val_accuracy"))],
        "Accuracy per epoch", "epoch", "accuracy", y_format=lambda value: f"{value:.0%}", css_class="chart curves",
    )
    return loss, accuracy


# --------------------------------------------------------------------------- pages
_environment = jinja2.Environment(
    loader=jinja2.FileSystemLoader(str(TEMPLATES)),
    autoescape=jinja2.select_autoescape(["html"]),
    undefined=jinja2.StrictUndefined,
)
_environment.filters["percent"] = lambda value: "—" if value is None else f"{value:.2%}"
_environment.filters["number"] = lambda value, digits=4: "—" if value is None else f"{value:.{digits}f}"
_environment.filters["dash"] = lambda value: "—" if value is None or value == "" else value
_environment.filters["pretty"] = lambda value: json.dumps(value, indent=2, sort_keys=True, default=str)


def tensorboard_url() -> str:
    return os.environ.get(TENSORBOARD_ENV) or DEFAULT_TENSORBOARD


def _page(name: str, status_code: int = 200, **context) -> HTMLResponse:
    text = _environment.get_template(name).render(dag_id=DAG_ID, **context)
    return HTMLResponse(text, status_code=status_code)


def _message(title: str, text: str, plugin_root: str, status_code: int) -> HTMLResponse:
    return _page("alexnet_message.html", status_code, title=title, text=text, plugin_root=plugin_root,
                 airflow_root=plugin_root + "../")


def _run_page(root: Path, run: Run, plugin_root: str) -> HTMLResponse:
    _load_details(root, run)
    loss_chart, accuracy_chart = training_curves(run.history)
    per_class = run.metrics.get("per_class_accuracy")
    files = {name: artifact_path(root, run.line, name) is not None for name in ARTIFACTS}
    return _page(
        "alexnet_run.html", run=run, plugin_root=plugin_root, airflow_root=plugin_root + "../",
        files=files, loss_chart=loss_chart, accuracy_chart=accuracy_chart,
        per_class=per_class if isinstance(per_class, dict) else {},
        tensorboard=tensorboard_url(), folder_name=run.folder.name if run.folder else None,
    )


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


@app.get("/runs", response_class=HTMLResponse)
def list_page() -> HTMLResponse:
    root = published_root()
    runs = load_runs(root)
    return _page("alexnet_runs.html", runs=runs, chart=accuracy_over_time(runs), plugin_root="",
                 airflow_root="../", root=str(root))


@app.get("/runs/{run_id}", response_class=HTMLResponse)
def run_page(run_id: str) -> HTMLResponse:
    root = published_root()
    run = find_run(root, run_id)
    if run is None:
        return _message("Unknown run", f"No published run {run_id!r} in the index.", "../", 404)
    return _run_page(root, run, "../")


@app.get("/runs/{run_id}/files/{name}")
def run_file(run_id: str, name: str) -> FileResponse:
    root = published_root()
    run = find_run(root, run_id)
    path = artifact_path(root, run.line, name) if run is not None else None
    if path is None:
        raise HTTPException(404, "Not Found")
    download = name == "model.keras"
    return FileResponse(path, media_type=ARTIFACTS[name], filename=name if download else None,
                        content_disposition_type="attachment" if download else "inline")


@app.get("/dags/{dag_id}/runs/{run_id}", response_class=HTMLResponse)
def run_tab(dag_id: str, run_id: str) -> HTMLResponse:
    plugin_root = "../../../"
    if dag_id != DAG_ID:
        return _message("No AlexNet results", f"Results are shown for runs of {DAG_ID}; {dag_id} is another DAG.",
                        plugin_root, 200)
    root = published_root()
    run = find_run(root, run_id)
    if run is None:
        return _message(
            "No results yet",
            f"Run {run_id} has not published results (yet): they appear here once its publish task has succeeded.",
            plugin_root, 404,
        )
    return _run_page(root, run, plugin_root)


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
