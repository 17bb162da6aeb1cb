"""The Airflow UI plugin (plugins/alexnet_results.py): pages, files, path safety, authentication, loading.

The pages are read through FastAPI's TestClient, with the plugin's app mounted
where Airflow mounts it, against runs that the pipeline's own train, evaluate
and publish wrote. Authentication is Airflow's simple auth manager with real
JWTs; its DAG access check reads the metadata database, so the test home's
SQLite database is migrated first.
"""

from __future__ import annotations

import html
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from urllib.parse import urljoin

import pytest

from builders import PLUGIN_FILE, assert_refused, evaluate_gate_publish, links, plugin_client, plugin_env, quoted
from conftest import ROOT

OLD_RUN = "manual__2026-11-28T10:00:00+00:00"
NEW_RUN = "scheduled__2026-11-29T02:00:00+00:00"


# --------------------------------------------------------------------------- loading (no training)
def test_plugin_module_imports_no_tensorflow_numpy_matplotlib_or_boto3():
    code = (
        "import sys, importlib.util\n"
        f"spec = importlib.util.spec_from_file_location('alexnet_results', {str(PLUGIN_FILE)!r})\n"
        "module = importlib.util.module_from_spec(spec)\n"
        "sys.modules[spec.name] = module  # as Airflow's plugin loader does\n"
        "spec.loader.exec_module(module)\n"
        "assert module.AlexNetResultsPlugin.fastapi_apps\n"
        "heavy = sorted({m.split('.')[0] for m in sys.modules} & {'tensorflow', 'keras', 'numpy', 'matplotlib', 'h5py',\n"
        "                                                     'boto3', 'botocore', 's3fs'})\n"
        "security = 'airflow.api_fastapi.core_api.security' in sys.modules\n"
        "package = all(m in sys.modules for m in ('alexnet_tasks.ui.runs', 'alexnet_tasks.ui.charts', "
        "'alexnet_tasks.release.registry'))\n"
        "print(package); print(','.join(heavy)); print(security)\n"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=plugin_env())
    assert run.returncode == 0, run.stderr[-3000:]
    out = run.stdout.splitlines()
    assert out[-3] == "True", "the pages' view model, charts and registry come from the package"
    assert out[-2] == "", f"loading the plugin imported {out[-2]}"
    assert out[-1] == "False", "loading the plugin imported the API server's security module"


@pytest.mark.slow
def test_airflow_lists_the_plugin_and_its_entries_fit_airflows_response_models(tmp_path):
    from airflow.api_fastapi.core_api.datamodels.plugins import PluginResponse

    env = {name: value for name, value in os.environ.items() if name != "AIRFLOW__CORE__PLUGINS_FOLDER"}
    env.update(AIRFLOW_HOME=str(tmp_path / "home"), ALEXNET_ARTIFACTS=str(tmp_path / "artifacts"))
    listed = subprocess.run([str(ROOT / "scripts" / "airflow.sh"), "plugins", "--output", "json"],
                            capture_output=True, text=True, env=env, timeout=300)
    assert listed.returncode == 0, listed.stderr[-3000:]
    [plugin] = [entry for entry in json.loads(listed.stdout) if entry["name"] == "alexnet_results"]
    # The API server drops a plugin whose entries do not validate: validate exactly as it does.
    response = PluginResponse.model_validate({**plugin, "source": str(plugin["source"])})
    views = {view.url_route: view for view in response.external_views}
    assert views["alexnet-runs"].destination == "nav" and views["alexnet-runs"].category == "browse"
    assert views["alexnet-runs"].name == "AlexNet runs" and views["alexnet-runs"].href == "alexnet/runs"
    assert views["alexnet-results"].destination == "dag_run" and views["alexnet-results"].name == "Results"
    assert views["alexnet-results"].href == "alexnet/dags/{DAG_ID}/runs/{RUN_ID}"
    assert all(not view.href.startswith(("/", "http")) for view in response.external_views), "relative hrefs only"
    assert [app.url_prefix for app in response.fastapi_apps] == ["/alexnet"]
    assert response.operator_extra_links == ["<alexnet_results.AlexNetResultsLink object>"]

    errors = subprocess.run(
        [sys.executable, "-c",
         "import json; from airflow import plugins_manager; print(json.dumps(plugins_manager.get_import_errors()))"],
        capture_output=True, text=True, env=plugin_env(), check=True,
    )
    assert json.loads(errors.stdout.splitlines()[-1]) == {}


def test_extra_link_on_train_evaluate_and_publish_opens_the_dag_runs_results_tab():
    code = (
        "import json\n"
        "from airflow.dag_processing.dagbag import DagBag\n"
        "from airflow.models.taskinstancekey import TaskInstanceKey\n"
        "from airflow.serialization.serialized_objects import DagSerialization\n"
        f"dag = DagBag({str(ROOT / 'dags')!r}).dags['alexnet_cifar10']\n"
        "served = DagSerialization.from_dict(DagSerialization.to_dict(dag))  # as the API server sees it\n"
        "class Instance:\n"
        "    def __init__(self, task_id):\n"
        f"        self.key = TaskInstanceKey(dag_id='alexnet_cifar10', task_id=task_id, run_id={OLD_RUN!r})\n"
        "links = {t.task_id: {n: t.get_extra_links(Instance(t.task_id), n) for n in t.extra_links} for t in served.tasks}\n"
        "print(json.dumps(links))\n"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=plugin_env())
    assert run.returncode == 0, run.stderr[-3000:]
    links = json.loads(run.stdout.splitlines()[-1])
    tab = "dags/alexnet_cifar10/runs/manual__2026-11-28T10%3A00%3A00%2B00%3A00/plugin/alexnet-results"
    for task_id in ("train", "evaluate", "publish"):
        assert links[task_id] == {"AlexNet results": tab}
    for task_id in ("download", "split", "build_shards"):
        assert not links[task_id].get("AlexNet results"), "the UI hides a link without a URL"


def test_every_deployment_loads_the_plugins_folder():
    import yaml

    sys.path.insert(0, str(ROOT / "scripts"))
    import cluster

    compose = yaml.safe_load((ROOT / "docker-compose.yaml").read_text())
    assert compose["x-airflow-common"]["environment"]["AIRFLOW__CORE__PLUGINS_FOLDER"] == "/opt/airflow/plugins"
    assert "COPY --chown=airflow:root plugins /opt/airflow/plugins" in (ROOT / "Dockerfile").read_text()
    state = {"dir": "/tmp/cluster", "database": "db", "redis_db": 1, "port": 8080, "artifacts": "/tmp/artifacts",
             "secrets": {"AIRFLOW_FERNET_KEY": "f", "AIRFLOW_JWT_SECRET": "j", "AIRFLOW_API_SECRET_KEY": "s"},
             "log_ports": {"triggerer": 8794}}
    assert cluster.environment(state)["AIRFLOW__CORE__PLUGINS_FOLDER"] == str(ROOT / "plugins")


def test_every_link_to_an_airflow_page_is_marked_for_the_whole_window():
    """Links that leave the plugin for Airflow's own pages carry target="_top" and data-airflow-page.

    Airflow frames the plugin in an iframe sandboxed without allow-top-navigation, so target="_top" alone does
    nothing there: alexnet_base.html's script follows the links marked data-airflow-page in the top window
    (tests/test_ui_browser.py clicks them in Chromium).
    """
    templates = ROOT / "plugins" / "templates"
    base = (templates / "alexnet_base.html").read_text()
    assert 'closest("a[data-airflow-page]")' in base and "top.history.pushState(" in base
    marked = 0
    for template in sorted(templates.glob("*.html")):
        for tag in re.findall(r"<a\b[^>]*>", template.read_text()):
            if 'href="{{ airflow_root }}' in tag:
                assert 'target="_top"' in tag and "data-airflow-page" in tag, f"{template.name}: {tag}"
                marked += 1
            else:
                assert "data-airflow-page" not in tag, f"{template.name}: a plugin link stays in the frame: {tag}"
    assert marked >= 5, "the runs list, run, sweep, history and promote pages link to Airflow"
    # The promote page's link to the DAG run it triggered is made by its script.
    promote = (templates / "alexnet_promote.html").read_text()
    assert 'link.target = "_top";' in promote and 'link.dataset.airflowPage = "";' in promote


def test_artifacts_root_agrees_with_the_pipeline(monkeypatch, tmp_path):
    from alexnet_tasks.layout import Layout

    monkeypatch.setenv("ALEXNET_ARTIFACTS", str(tmp_path / "somewhere"))
    from alexnet_tasks.ui.runs import published_root

    assert published_root() == Layout().published


# --------------------------------------------------------------------------- pages on real published runs
@pytest.fixture(scope="module")
def published(trained_run, tmp_path_factory) -> Path:
    """Artifacts with two runs gated and published by the pipeline: an older champion, and a newer run
    evaluated with test-time augmentation that the gate refused (a floor above its accuracy)."""
    from dataclasses import replace

    from alexnet_tasks.layout import Layout

    config, shards_dir, trained_dir, _ = trained_run
    root = tmp_path_factory.mktemp("plugin") / "artifacts"
    layout = Layout(root)
    # The floor at 0 for the champion: three epochs on tiny data need not reach the default 25%.
    evaluate_gate_publish(trained_dir, shards_dir, root, OLD_RUN, replace(config, accuracy_floor=0.0))
    evaluate_gate_publish(trained_dir, shards_dir, root, NEW_RUN, replace(config, accuracy_floor=1.0),
                          test_time_augmentation="flip")
    shutil.copytree(shards_dir, layout.shards(config))  # where a run's shards are: the compare page reads the test labels
    return root


@pytest.fixture
def client(published, tokens, monkeypatch):
    """A browser-like client: the plugin app mounted at its prefix, the viewer's ``_token`` cookie."""
    monkeypatch.setenv("ALEXNET_ARTIFACTS", str(published))
    monkeypatch.setenv("ALEXNET_TENSORBOARD_URL", "http://tensorboard.example:6006")
    with plugin_client(tokens["viewer"]) as test_client:
        yield test_client


def old_folder() -> str:
    """The published folder of the champion run: its run id's readable name plus hash."""
    from alexnet_tasks.layout import run_folder_name

    return run_folder_name(OLD_RUN)


def new_folder() -> str:
    from alexnet_tasks.layout import run_folder_name

    return run_folder_name(NEW_RUN)


def index_entry(run_id: str) -> dict:
    from alexnet_tasks.release.registry import Registry

    return Registry(Path(os.environ["ALEXNET_ARTIFACTS"]) / "published").find(run_id)


def duration(seconds: float) -> str:
    from alexnet_tasks.ui.runs import duration as shown

    return shown(seconds)


def own_scripts(page: str) -> list[str]:
    """The page's inline scripts besides alexnet_base.html's, which every page has (links to Airflow's pages)."""
    scripts = re.findall(r"<script>(.*?)</script>", page, re.S)
    assert len(re.findall(r"<script", page)) == len(scripts), "inline scripts only"
    return [script for script in scripts if 'closest("a[data-airflow-page]")' not in script]


@pytest.mark.slow
def test_list_page_shows_every_run_newest_first_with_the_champion(client):
    response = client.get("/alexnet/runs")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/html")
    page = response.text
    assert page.index(NEW_RUN) < page.index(OLD_RUN), "newest first"
    metrics = json.loads((Path(os.environ["ALEXNET_ARTIFACTS"]) / "published" / "latest" / "metrics.json").read_text())
    assert f"{metrics['test_accuracy']:.2%}" in page
    rows = re.findall(r'<tr class="run" data-run-id="([^"]+)">(.*?)</tr>', page, re.S)
    by_id = dict(rows)
    assert set(by_id) == {OLD_RUN, NEW_RUN}
    assert "champion (latest)" in by_id[OLD_RUN] and "champion (latest)" not in by_id[NEW_RUN]
    entry = index_entry(NEW_RUN)
    assert "not blessed" in by_id[NEW_RUN] and f">{entry['devices']}<" in by_id[NEW_RUN]
    assert f">{entry['epochs_run']}<" in by_id[NEW_RUN] and f"{entry['validation_accuracy']:.2%}" in by_id[NEW_RUN]
    assert duration(entry["seconds"]) in by_id[NEW_RUN]
    assert ">fast<" in by_id[OLD_RUN] and ">67<" in by_id[OLD_RUN]
    assert page.count("<polyline") == 1 and "Test accuracy of the published runs" in page
    for href in links(page):
        assert not href.startswith(("/", "http")), f"absolute link {href}"
    # Every run link leads to its page; the Airflow links leave the plugin for the DAG run.
    for href in links(page):
        url = urljoin("http://airflow.test/alexnet/runs", href)
        if url.startswith("http://airflow.test/alexnet/"):
            assert client.get(url).status_code == 200, url
        else:
            assert url.startswith("http://airflow.test/dags/alexnet_cifar10/runs/"), url


@pytest.mark.slow
def test_run_page_shows_metrics_curves_classes_pictures_config_and_tensorboard(client, published):
    url = f"http://airflow.test/alexnet/runs/{quoted(OLD_RUN)}"
    response = client.get(url)
    assert response.status_code == 200
    page = response.text
    run = published / "published" / "runs" / old_folder()
    metrics = json.loads((run / "metrics.json").read_text())
    history = json.loads((run / "history.json").read_text())
    assert f"{metrics['test_accuracy']:.2%}" in page and f"{metrics['test_loss']:.4f}" in page
    assert f"{history[-1]['val_accuracy']:.2%}" in page
    assert page.count('<polyline class="series"') == 4, "train and validation loss and accuracy"
    for name in metrics["class_names"]:
        assert f"<th>{name}</th>" in page
    assert "http://tensorboard.example:6006" in page
    # The resolved config: the values the run trained with, batch size and learning rate included.
    trained = json.loads((run / "config.json").read_text())["train"]
    table = re.search(r'<table id="config">(.*?)</table>', page, re.S).group(1)
    for name in ("recipe", "batch_size", "learning_rate", "momentum", "image_size"):
        assert re.search(rf"<th>{name}</th><td>{re.escape(str(trained[name]))}\b", table), name
    assert "champion (latest)" in page
    images = {re.search(r'id="([^"]+)"', tag).group(1): re.search(r'src="([^"]+)"', tag).group(1)
              for tag in re.findall(r"<img [^>]+>", page)}
    assert set(images) == {"confusion-matrix", "test-samples"}
    for element, src in images.items():
        picture = client.get(urljoin(url, src))
        assert picture.status_code == 200 and picture.headers["content-type"] == "image/png", element
        assert picture.content == (run / ("confusion_matrix.png" if element == "confusion-matrix" else "test_samples.png")).read_bytes()
    model = client.get(urljoin(url, f"{quoted(OLD_RUN)}/files/model.keras"))
    assert model.status_code == 200 and "attachment" in model.headers["content-disposition"]


@pytest.mark.slow
def test_run_page_shows_the_gate_decision_as_a_verdict_with_its_checks(client, published):
    page = client.get(f"/alexnet/runs/{quoted(NEW_RUN)}").text
    run = published / "published" / "runs" / new_folder()
    metrics = json.loads((run / "metrics.json").read_text())
    decision = json.loads((run / "decision.json").read_text())
    assert f"flip views; plain {metrics['test_accuracy_plain']:.2%}" in page, "test-time augmentation"
    assert 'id="test-accuracy-plain"' not in client.get(f"/alexnet/runs/{quoted(OLD_RUN)}").text
    verdict = re.search(r'<p id="verdict"[^>]*>(.*?)</p>', page, re.S).group(1)
    assert "Not blessed" in verdict and html.escape("; ".join(decision["reasons"])) in " ".join(verdict.split())
    rows = re.findall(r'<tr class="check (passed|failed)"><th>([^<]+)</th>\s*<td>(passed|failed)</td><td>([^<]*)</td>',
                      page)
    assert sorted((state, html.unescape(detail)) for state, _, _, detail in rows) == sorted(
        ("passed" if check["passed"] else "failed", check["detail"]) for check in decision["checks"].values())
    names = [name for _, name, _, _ in rows]
    assert names[0] == "finite test loss" and names[-1] == "not worse than the champion", "the gate's order"
    assert ("failed", "accuracy floor") in [(state, name) for state, name, _, _ in rows]
    assert f"<code>{decision['champion']}</code>" in page and decision["champion"] == OLD_RUN
    assert "True" not in verdict and "{" not in verdict, "a verdict, not a dump"
    assert metrics["fingerprint"] in page and f"<code>{new_folder()}</code>" in page
    src = re.search(r'id="confusion-matrix"[^>]*src="([^"]+)"', page).group(1)
    assert client.get(urljoin(f"http://airflow.test/alexnet/runs/{quoted(NEW_RUN)}", src)).status_code == 200


@pytest.mark.slow
def test_list_page_pages_newest_first_and_filters_by_blessed_and_recipe(client, tmp_path, monkeypatch):
    from alexnet_tasks.config import PipelineConfig
    from alexnet_tasks.release.registry import Registry, index_line

    registry = Registry(tmp_path / "published")
    for number in range(7):
        config = PipelineConfig(recipe="reference" if number % 2 else "fast")
        decision = {"blessed": number % 3 != 0, "reasons": [f"decision {number}"]}
        registry.record(index_line(f"run-{number}", {"test_accuracy": 0.5, "test_loss": 1.0},
                                   f"2026-11-0{number + 1}T02:00:00+00:00", config, None, decision))
    monkeypatch.setenv("ALEXNET_ARTIFACTS", str(tmp_path))

    def shown(url):
        page = client.get(url).text
        return re.findall(r'<tr class="run" data-run-id="([^"]+)">', page), page

    first, page = shown("/alexnet/runs?size=3")
    assert first == ["run-6", "run-5", "run-4"] and 'id="newer"' not in page and "page 1 of 3" in page
    older = re.search(r'id="older" href="([^"]+)"', page).group(1)
    assert not older.startswith(("/", "http"))
    second, page = shown(urljoin("http://airflow.test/alexnet/runs?size=3", html.unescape(older)))
    assert second == ["run-3", "run-2", "run-1"] and 'id="newer"' in page
    blessed, _ = shown("/alexnet/runs?blessed=true")
    assert blessed == ["run-5", "run-4", "run-2", "run-1"]
    reference, page = shown("/alexnet/runs?blessed=true&recipe=reference")
    assert reference == ["run-5", "run-1"] and '<option value="reference" selected>' in page
    assert 'action="runs"' in page and not own_scripts(page), "a plain form"
    assert client.get("/alexnet/runs?page=0").status_code == 400


@pytest.mark.slow
def test_results_tab_shows_the_run_and_says_so_for_unknown_runs_and_other_dags(client):
    url = f"http://airflow.test/alexnet/dags/alexnet_cifar10/runs/{quoted(OLD_RUN)}"
    tab = client.get(url)
    assert tab.status_code == 200 and 'id="confusion-matrix"' in tab.text
    src = re.search(r'id="confusion-matrix"[^>]*src="([^"]+)"', tab.text).group(1)
    assert client.get(urljoin(url, src)).headers["content-type"] == "image/png", "relative to the tab's URL"
    back = re.search(r'href="([^"]+)">All AlexNet runs', tab.text).group(1)
    assert urljoin(url, back) == "http://airflow.test/alexnet/runs"
    airflow_run = re.search(r'href="([^"]+)">Airflow run', tab.text).group(1)
    assert urljoin(url, airflow_run) == f"http://airflow.test/dags/alexnet_cifar10/runs/{quoted(OLD_RUN)}"

    unknown = client.get("/alexnet/dags/alexnet_cifar10/runs/manual__2026-01-01T00%3A00%3A00%2B00%3A00")
    assert unknown.status_code == 404 and "has not published results (yet)" in unknown.text
    other = client.get(f"/alexnet/dags/another_dag/runs/{quoted(OLD_RUN)}")
    assert other.status_code == 200 and "another DAG" in other.text and "confusion-matrix" not in other.text


@pytest.mark.slow
def test_every_route_wants_an_airflow_user_allowed_to_read_dag_runs(client, tokens):
    routes = ["/alexnet/runs", f"/alexnet/runs/{quoted(OLD_RUN)}",
              f"/alexnet/runs/{quoted(OLD_RUN)}/files/confusion_matrix.png",
              f"/alexnet/dags/alexnet_cifar10/runs/{quoted(OLD_RUN)}"]
    for route in routes:
        assert client.get(route).status_code == 200, route
        client.cookies.clear()
        assert client.get(route).status_code == 401, route
        assert client.get(route, headers={"Authorization": "Bearer not-a-token"}).status_code == 403, route
        assert client.get(route, headers={"Authorization": f"Bearer {tokens['admin']}"}).status_code == 200, route
        client.cookies.set("_token", tokens["viewer"])


@pytest.mark.slow
def test_only_named_artifacts_of_indexed_runs_inside_published_are_served(client, published, tmp_path, monkeypatch):
    root = tmp_path / "artifacts"
    shutil.copytree(published, root, symlinks=True)
    monkeypatch.setenv("ALEXNET_ARTIFACTS", str(root))
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "confusion_matrix.png").write_bytes(b"secret")
    (outside / "metrics.json").write_text('{"test_accuracy": 0.99}')
    runs = root / "published" / "runs"
    (runs / "escape").symlink_to(outside)  # a run folder that is a link out of published/
    run = runs / old_folder()
    (run / "test_samples.png").unlink()
    (run / "test_samples.png").symlink_to(outside / "confusion_matrix.png")  # a file that links out
    (run / "state.json").write_text("{}")  # a file that is not a served artifact
    with (root / "published" / "index.jsonl").open("a") as index:
        index.write(json.dumps({"run_id": "dotdot", "path": "../../outside", "test_accuracy": 0.99}) + "\n")
        index.write(json.dumps({"run_id": "absolute", "path": str(outside), "test_accuracy": 0.99}) + "\n")
        index.write(json.dumps({"run_id": "link", "path": "runs/escape", "test_accuracy": 0.99}) + "\n")
        index.write("not json\n")

    good = f"/alexnet/runs/{quoted(OLD_RUN)}/files"
    assert client.get(f"{good}/confusion_matrix.png").status_code == 200
    refused = [
        f"{good}/test_samples.png", f"{good}/state.json", f"{good}/tensorboard",
        f"{good}/..%2F..%2Findex.jsonl", f"{good}/%2e%2e%2f%2e%2e%2findex.jsonl", f"{good}/..%5Cmetrics.json",
        f"/alexnet/runs/..%2F..%2Findex.jsonl/files/metrics.json", "/alexnet/runs/%2e%2e/files/metrics.json",
        "/alexnet/runs/dotdot/files/metrics.json", "/alexnet/runs/dotdot/files/confusion_matrix.png",
        "/alexnet/runs/absolute/files/metrics.json", "/alexnet/runs/link/files/confusion_matrix.png",
        "/alexnet/runs/unknown/files/metrics.json", "/alexnet/runs/unknown",
        f"/alexnet/runs/runs%2F{old_folder()}/files/metrics.json",
    ]
    assert_refused(client, refused)
    page = client.get("/alexnet/runs").text
    assert page.count("files missing") == 3, "runs whose folder is outside published/ are listed without files"
    assert "not json" not in page


@pytest.mark.slow
def test_list_page_without_published_runs_says_so(client, tmp_path, monkeypatch):
    monkeypatch.setenv("ALEXNET_ARTIFACTS", str(tmp_path / "nothing-yet"))
    response = client.get("/alexnet/runs")
    assert response.status_code == 200 and "No published runs yet" in response.text
    assert client.get(f"/alexnet/dags/alexnet_cifar10/runs/{quoted(OLD_RUN)}").status_code == 404


# --------------------------------------------------------------------------- compare two runs
def cells(page: str, table: str) -> dict[str, list[str]]:
    """``{row header: [cell texts]}`` of the table with id ``table``."""
    body = re.search(rf'<table id="{table}">(.*?)</table>', page, re.S).group(1)
    rows = re.findall(r"<tr><th>([^<]*)</th>(.*?)</tr>", body, re.S)
    return {html.unescape(name): [html.unescape(re.sub(r"<[^>]+>", "", cell)).strip()
                                  for cell in re.findall(r"<td[^>]*>(.*?)</td>", rest, re.S)]
            for name, rest in rows if "<td" in rest}  # a header row has no data cells


@pytest.mark.slow
def test_compare_page_shows_what_differs_the_deltas_the_paired_table_curves_and_both_matrices(client, published):
    from alexnet_tasks.release.gate import mcnemar_p

    url = f"http://airflow.test/alexnet/compare?a={quoted(NEW_RUN)}&b={quoted(OLD_RUN)}"
    response = client.get(url)
    assert response.status_code == 200, response.text[-2000:]
    page = response.text
    runs = published / "published" / "runs"
    new, old = (json.loads((runs / folder / "metrics.json").read_text()) for folder in (new_folder(), old_folder()))
    # Only the settings that differ: the gate's floor (the new run was gated with 1.0), not the shared image size.
    settings = cells(page, "settings")
    assert settings["accuracy_floor"] == ["1.0", str(index_entry(OLD_RUN)["config"]["accuracy_floor"])]
    assert "image_size" not in settings and "recipe" not in settings
    headline = cells(page, "headline")
    assert headline["test accuracy"][:2] == [f"{new['test_accuracy']:.2%}", f"{old['test_accuracy']:.2%}"]
    assert headline["test accuracy"][2] == f"{(new['test_accuracy'] - old['test_accuracy']) * 100:+.2f} pt"
    assert headline["test loss"][2] == f"{new['test_loss'] - old['test_loss']:+.4f}"
    per_class = cells(page, "per-class")
    assert list(per_class) == new["class_names"]
    for name in new["class_names"]:
        a, b = new["per_class_accuracy"][name], old["per_class_accuracy"][name]
        assert per_class[name] == [f"{a:.2%}", f"{b:.2%}", f"{(a - b) * 100:+.2f} pt"]
    # The paired table is the gate's own comparison of the new run with the champion (plain predictions of both).
    paired = json.loads((runs / new_folder() / "decision.json").read_text())["paired"]
    shown = {name: int(re.search(rf'id="{name}">(\d+)<', page).group(1))
             for name in ("both-right", "only-a", "only-b", "both-wrong")}
    assert shown == {"both-right": paired["both_right"], "only-a": paired["only_challenger_right"],
                     "only-b": paired["only_champion_right"], "both-wrong": paired["both_wrong"]}
    assert sum(shown.values()) == new["test_images"]
    p_value = mcnemar_p(paired["only_challenger_right"], paired["only_champion_right"])
    assert re.search(r'id="mcnemar-p">([^<]+)<', page).group(1) == f"{p_value:.4f}"
    assert "plain predictions" in page
    # Both runs' curves on one loss and one accuracy chart; both confusion matrices, served.
    curves = re.search(r'<div class="charts" id="curves">(.*?)</div>', page, re.S).group(1)
    assert curves.count('<polyline class="series"') == 8
    assert set(re.findall(r'data-series="([^"]+)"', curves)) == {"A train", "A validation", "B train", "B validation"}
    for label, folder in (("a", new_folder()), ("b", old_folder())):
        src = re.search(rf'id="confusion-matrix-{label}"[^>]*src="([^"]+)"', page).group(1)
        picture = client.get(urljoin(url, src))
        assert picture.status_code == 200 and picture.content == (runs / folder / "confusion_matrix.png").read_bytes()
    for href in map(html.unescape, links(page) + links(page, "src")):
        assert not href.startswith(("/", "http")), f"absolute link {href}"
        assert client.get(urljoin(url, href)).status_code == 200, href
    swapped = client.get(urljoin(url, html.unescape(re.search(r'id="swap" href="([^"]+)"', page).group(1))))
    assert cells(swapped.text, "headline")["test accuracy"][:2] == headline["test accuracy"][1::-1]


@pytest.mark.slow
def test_run_page_links_to_the_comparison_with_the_champion_and_the_list_picks_two(client):
    page = client.get(f"/alexnet/runs/{quoted(NEW_RUN)}").text
    href = html.unescape(re.search(r'id="compare-with-champion" href="([^"]+)"', page).group(1))
    url = urljoin(f"http://airflow.test/alexnet/runs/{quoted(NEW_RUN)}", href)
    assert url == f"http://airflow.test/alexnet/compare?a={quoted(NEW_RUN)}&b={quoted(OLD_RUN)}"
    assert client.get(url).status_code == 200
    assert 'id="compare-with-champion"' not in client.get(f"/alexnet/runs/{quoted(OLD_RUN)}").text, "the champion itself"
    # The list is a plain GET form: radio buttons a and b, the newest other run against the champion to start with.
    listing = client.get("/alexnet/runs").text
    form = re.search(r'<form id="compare" method="get" action="([^"]+)">(.*?)</form>', listing, re.S)
    assert form.group(1) == "compare" and not own_scripts(listing)
    checked = dict(re.findall(r'<input type="radio" name="(a|b)" value="([^"]+)"[^>]* checked>', form.group(2)))
    assert checked == {"a": NEW_RUN, "b": OLD_RUN}
    submitted = client.get(urljoin("http://airflow.test/alexnet/runs", form.group(1)),
                           params={"a": OLD_RUN, "b": NEW_RUN})
    assert submitted.status_code == 200 and re.search(r'id="run-a"[^>]*>([^<]+)<', submitted.text).group(1) == OLD_RUN


@pytest.mark.slow
def test_compare_page_names_an_unknown_run_and_says_why_there_is_no_paired_table(client, published, tmp_path,
                                                                                  monkeypatch):
    unknown = client.get(f"/alexnet/compare?a={quoted(NEW_RUN)}&b=nope")
    assert unknown.status_code == 404 and "nope" in unknown.text
    assert client.get(f"/alexnet/compare?a={quoted(NEW_RUN)}").status_code == 400
    # Without the runs' shards (only published/ copied elsewhere) the figures are there, the paired table says why not.
    elsewhere = tmp_path / "artifacts"
    shutil.copytree(published / "published", elsewhere / "published", symlinks=True)
    monkeypatch.setenv("ALEXNET_ARTIFACTS", str(elsewhere))
    page = client.get(f"/alexnet/compare?a={quoted(NEW_RUN)}&b={quoted(OLD_RUN)}")
    assert page.status_code == 200 and 'id="headline"' in page.text
    reason = re.search(r'<p id="paired" class="empty">(.*?)</p>', page.text, re.S).group(1)
    assert "test shard" in reason and str(elsewhere / "data") in html.unescape(reason)
