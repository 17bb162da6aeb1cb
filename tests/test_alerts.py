"""Alerts through a real SMTP server on 127.0.0.1 and a real HTTP webhook, from real Airflow runs."""

from __future__ import annotations

import http.server
import json
import select
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from conftest import airflow_bin, airflow_env
from smtp_server import SMTPServer

from alexnet_tasks.ops import alerts
from alexnet_tasks.ops.alerts import AlertSettings, failure_alert, notify_not_blessed

WRONG_MD5 = "0" * 32
UNBLESSED = {  # as the gate writes decision.json
    "blessed": False,
    "reasons": ["test accuracy 0.1000 is below the floor 0.25", "worse than the champion by 0.4200"],
    "test_accuracy": 0.1,
    "champion": "scheduled__2026-11-27T02:00:00+00:00",
    "champion_accuracy": 0.52,
    "paired": {"images": 10000, "only_challenger_right": 310, "only_champion_right": 4510, "mcnemar_p": 1.2e-30},
}


def smtp_connection(port: int) -> str:
    """An Airflow SMTP connection (as an AIRFLOW_CONN_* value) for the plain-text test server."""
    return json.dumps({"conn_type": "smtp", "host": "127.0.0.1", "port": port,
                       "extra": {"disable_ssl": True, "disable_tls": True, "retry_limit": 0, "timeout": 10}})


@pytest.fixture
def mail_env(smtp, monkeypatch):
    monkeypatch.setenv("AIRFLOW_CONN_ALEXNET_TEST_SMTP", smtp_connection(smtp.port))
    monkeypatch.setenv("ALEXNET_ALERT_SMTP_CONN", "alexnet_test_smtp")
    monkeypatch.setenv("ALEXNET_ALERT_EMAIL", "ml-team@example.com; oncall@example.com")
    monkeypatch.setenv("ALEXNET_ALERT_FROM", "pipeline@example.com")
    monkeypatch.delenv("ALEXNET_ALERT_WEBHOOK", raising=False)
    return smtp


class _Hook(http.server.BaseHTTPRequestHandler):
    def do_POST(self):
        body = self.rfile.read(int(self.headers["Content-Length"]))
        self.server.posts.append((self.headers["Content-Type"], json.loads(body)))
        self.send_response(204)
        self.end_headers()

    def log_message(self, *args):
        pass


@pytest.fixture
def webhook():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Hook)
    server.posts = []
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server, f"http://127.0.0.1:{server.server_address[1]}/alerts"
    server.shutdown()
    server.server_close()


def test_settings_come_from_the_environment_and_are_off_when_unset():
    assert not AlertSettings.from_env({}).enabled
    settings = AlertSettings.from_env({"ALEXNET_ALERT_EMAIL": "a@x.org, b@x.org;c@x.org",
                                       "ALEXNET_ALERT_WEBHOOK": "https://hooks.example.com/x"})
    assert settings.recipients == ("a@x.org", "b@x.org", "c@x.org")
    assert settings.smtp_conn_id == "smtp_default" and settings.webhook_url == "https://hooks.example.com/x"
    with pytest.raises(ValueError, match="ALEXNET_ALERT_WEBHOOK='ftp://x': expected an http"):
        AlertSettings.from_env({"ALEXNET_ALERT_WEBHOOK": "ftp://x"})


def test_importing_the_module_does_not_import_airflow():
    code = ("import sys; import alexnet_tasks.ops.alerts\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] == 'airflow'))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[1]).stdout
    assert out.strip() == "[]"


def test_the_notifier_is_an_airflow_notifier():
    from airflow.sdk import BaseNotifier

    assert issubclass(alerts.AlertNotifier, BaseNotifier)
    assert isinstance(alerts.failure_notifier(), BaseNotifier)


def test_unblessed_model_is_mailed_with_the_gates_reason(mail_env):
    outcome = notify_not_blessed(UNBLESSED, "manual__2026-11-28T10:00:00+00:00", task_id="gate", try_number=1)
    assert outcome == {"email": "sent"}
    [mail] = mail_env.messages
    assert mail.sender == "pipeline@example.com"
    assert mail.recipients == ["ml-team@example.com", "oncall@example.com"]
    subject = mail.message["Subject"]
    assert "alexnet_cifar10" in subject and "manual__2026-11-28T10:00:00+00:00" in subject
    assert "not blessed" in subject and "below the floor 0.25" in subject
    body = mail.body()
    for fact in ("DAG: alexnet_cifar10", "run: manual__2026-11-28T10:00:00+00:00", "task: gate", "try: 1",
                 "reason: test accuracy 0.1000 is below the floor 0.25; worse than the champion by 0.4200",
                 "champion: scheduled__2026-11-27T02:00:00+00:00", "champion_accuracy: 0.52",
                 "only this model right on 310 images, only the champion on 4510, McNemar p=1.2e-30"):
        assert fact in body


def test_text_is_sent_verbatim_never_templated_or_as_markup(mail_env):
    notify_not_blessed({"blessed": False, "reasons": ["{{ 7 * 7 }} <b>x</b>\nsecond line"]}, "r1")
    [mail] = mail_env.messages
    assert "{{ 7 * 7 }}" in mail.message["Subject"] and "\n" not in mail.message["Subject"]
    assert "{{ 7 * 7 }} &lt;b&gt;x&lt;/b&gt;" in mail.body()


def test_webhook_gets_the_alert_as_json_and_a_dead_mail_server_does_not_stop_it(webhook, monkeypatch):
    server, url = webhook
    dead = SMTPServer()
    port = dead.port
    dead.server_close()  # nothing listens there any more
    monkeypatch.setenv("AIRFLOW_CONN_ALEXNET_DEAD_SMTP", smtp_connection(port))
    settings = AlertSettings(recipients=("ml@example.com",), smtp_conn_id="alexnet_dead_smtp", webhook_url=url)
    outcome = notify_not_blessed(UNBLESSED, "manual__x", task_id="gate", try_number=2, settings=settings)
    assert outcome["webhook"] == "sent" and outcome["email"] != "sent"  # logged, not raised
    [(content_type, payload)] = server.posts
    assert content_type == "application/json"
    assert payload["event"] == "model_not_blessed" and payload["run_id"] == "manual__x"
    assert payload["task_id"] == "gate" and payload["try_number"] == 2
    assert payload["reason"].startswith("test accuracy 0.1000 is below the floor")
    assert payload["decision"]["champion_accuracy"] == 0.52


def test_alerts_off_send_nothing_and_raise_nothing(smtp, monkeypatch, caplog):
    for name in ("ALEXNET_ALERT_EMAIL", "ALEXNET_ALERT_WEBHOOK"):
        monkeypatch.delenv(name, raising=False)
    caplog.set_level("INFO")
    assert notify_not_blessed(UNBLESSED, "r") == {}
    alerts.failure_notifier()({"run_id": "r", "exception": ValueError("boom")})
    assert smtp.messages == []
    assert "alerts are off" in caplog.text


def test_failure_alert_names_dag_run_task_try_and_error():
    class TI:
        dag_id, task_id, run_id, try_number, max_tries = "alexnet_cifar10", "train", "manual__1", 3, 2

    alert = failure_alert({"ti": TI(), "exception": RuntimeError("worker lost")})
    assert alert.subject == "[alexnet_cifar10] task train failed in run manual__1 (try 3 of 3)"
    assert "error: RuntimeError: worker lost" in alert.text
    assert failure_alert({"ti": TI()}).payload["error"].startswith("no exception was recorded")


def _unreachable_url() -> str:
    with socket.socket() as probe:  # a port nothing listens on once the probe is closed
        probe.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{probe.getsockname()[1]}/cifar-10-python.tar.gz"


def _failing_run(small_archive, tmp_path, source_url: str | None = None, **env) -> subprocess.CompletedProcess:
    """``airflow dags test`` of the DAG whose download fails: with a wrong MD5 (at once, a permanent
    error) or, given ``source_url``, a source that cannot be reached (on every try, retried)."""
    path, md5 = small_archive
    environment = airflow_env(tmp_path / "home", tmp_path / "artifacts", ALEXNET_RETRY_DELAY_SECONDS="1", **env)
    for name in ("ALEXNET_ALERT_EMAIL", "ALEXNET_ALERT_WEBHOOK"):
        if name not in env:
            environment.pop(name, None)
    subprocess.run([airflow_bin(), "db", "migrate"], env=environment, check=True, capture_output=True)
    source = {"source_url": source_url, "source_md5": md5} if source_url else \
        {"source_url": path.as_uri(), "source_md5": WRONG_MD5}
    conf = {**source, "image_size": 67, "epochs": 1,
            "validation_size": 50}
    return subprocess.run([airflow_bin(), "dags", "test", "alexnet_cifar10", "-c", json.dumps(conf)],
                          env=environment, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_a_failing_run_mails_its_failed_task_once_after_the_last_try(small_archive, tmp_path, smtp, webhook):
    server, url = webhook
    url_down = _unreachable_url()
    run = _failing_run(small_archive, tmp_path, url_down, AIRFLOW_CONN_ALEXNET_TEST_SMTP=smtp_connection(smtp.port),
                       ALEXNET_ALERT_SMTP_CONN="alexnet_test_smtp", ALEXNET_ALERT_EMAIL="ml-team@example.com",
                       ALEXNET_ALERT_WEBHOOK=url)
    output = run.stdout + run.stderr
    assert run.returncode != 0 and "cannot connect" in output, output[-4000:]
    assert "Failed to run task callback" not in output
    [mail] = smtp.messages  # the retries before the last try send nothing
    subject, body = mail.message["Subject"], mail.body()
    assert mail.recipients == ["ml-team@example.com"]
    assert subject.startswith("[alexnet_cifar10] task download failed in run manual__") and "(try 3 of 3)" in subject
    assert "DAG: alexnet_cifar10" in body and "task: download" in body and "try: 3 of 3" in body
    assert f"{url_down}: cannot connect" in body
    [(_, payload)] = server.posts
    assert payload["event"] == "task_failed" and payload["task_id"] == "download" and payload["try_number"] == 3
    assert payload["run_id"] in subject and "cannot connect" in payload["error"]
    runs = subprocess.run([airflow_bin(), "dags", "list-runs", "alexnet_cifar10", "-o", "json"],
                          env=airflow_env(tmp_path / "home", tmp_path / "artifacts"), capture_output=True,
                          text=True, check=True).stdout
    [dag_run] = json.loads(next(line for line in runs.splitlines() if line.startswith("[{")))
    assert dag_run["run_id"] == payload["run_id"] and dag_run["state"] == "failed"


@pytest.mark.slow
def test_a_failing_run_without_alert_settings_sends_nothing_and_the_callback_does_not_error(
        small_archive, tmp_path, smtp):
    run = _failing_run(small_archive, tmp_path, AIRFLOW_CONN_SMTP_DEFAULT=smtp_connection(smtp.port))
    output = run.stdout + run.stderr
    assert run.returncode != 0 and "MD5 mismatch" in output, output[-4000:]
    assert "alerts are off" in output
    assert "Failed to run task callback" not in output
    assert smtp.messages == []


# --------------------------------------------------------------------------- channels that hold the line
DRIP_SECONDS = 3


class _DrippingHook(http.server.BaseHTTPRequestHandler):
    """Answers 200 with its headers at once, then its 12-byte body one byte every 3 s (36 s in all)."""

    def do_POST(self):
        self.rfile.read(int(self.headers["Content-Length"]))
        self.send_response(200)
        self.send_header("Content-Length", "12")
        self.end_headers()
        self.wfile.flush()
        for value in b"accepted ok\n":
            try:
                self.wfile.write(bytes([value]))
                self.wfile.flush()
                readable, _, _ = select.select([self.connection], [], [], DRIP_SECONDS)
                if readable and not self.connection.recv(1024):
                    break
            except OSError:
                break
        self.server.closed_at = time.monotonic()

    def log_message(self, *args):
        pass


@pytest.fixture
def dripping_webhook():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _DrippingHook)
    server.daemon_threads = True
    server.closed_at = None
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server, f"http://127.0.0.1:{server.server_address[1]}/alerts"
    server.shutdown()
    server.server_close()


@pytest.fixture
def slow_smtp():
    server = SMTPServer(slow_seconds=DRIP_SECONDS).start()
    yield server
    server.stop()


def _timed_delivery(settings: AlertSettings) -> tuple[dict, float, float]:
    started = time.monotonic()
    outcome = alerts.deliver(alerts.not_blessed_alert(UNBLESSED, "manual__slow"), settings)
    returned = time.monotonic()
    return outcome, returned - started, returned


def _logged(caplog, capsys) -> str:
    """What was logged: Airflow, imported by the first mail sent, may move logging to stdout mid-test."""
    return caplog.text + capsys.readouterr().out


def _late(outcome: str) -> bool:
    return outcome.startswith("TimeoutError: not delivered within the 10 s deadline")


def test_a_webhook_that_drips_its_answer_is_cut_at_the_deadline_and_mail_still_goes(
        dripping_webhook, smtp, monkeypatch, caplog, capsys):
    server, url = dripping_webhook
    monkeypatch.setenv("AIRFLOW_CONN_ALEXNET_TEST_SMTP", smtp_connection(smtp.port))
    settings = AlertSettings(recipients=("oncall@example.com",), smtp_conn_id="alexnet_test_smtp",
                             from_email="pipeline@example.com", webhook_url=url)
    outcome, seconds, returned = _timed_delivery(settings)
    assert alerts.ALERT_DEADLINE_SECONDS - 0.5 <= seconds < alerts.ALERT_DEADLINE_SECONDS + 2
    assert _late(outcome["webhook"]) and outcome["email"] == "sent"
    assert len(smtp.messages) == 1
    assert "webhook delivery failed: TimeoutError" in _logged(caplog, capsys)
    # The late connection is shut at the deadline, not left to drip on.
    deadline = time.monotonic() + DRIP_SECONDS + 2
    while server.closed_at is None and time.monotonic() < deadline:
        time.sleep(0.1)
    assert server.closed_at is not None and server.closed_at - returned < 2


def test_a_slow_mail_server_and_a_slow_webhook_together_hold_the_alert_one_deadline(
        dripping_webhook, slow_smtp, monkeypatch, caplog, capsys):
    server, url = dripping_webhook
    monkeypatch.setenv("AIRFLOW_CONN_ALEXNET_TEST_SMTP", smtp_connection(slow_smtp.port))
    settings = AlertSettings(recipients=("oncall@example.com",), smtp_conn_id="alexnet_test_smtp",
                             from_email="pipeline@example.com", webhook_url=url)
    outcome, seconds, returned = _timed_delivery(settings)
    assert alerts.ALERT_DEADLINE_SECONDS - 0.5 <= seconds < alerts.ALERT_DEADLINE_SECONDS + 2
    assert _late(outcome["email"]) and _late(outcome["webhook"])
    assert "email delivery failed: TimeoutError" in _logged(caplog, capsys)
    deadline = time.monotonic() + DRIP_SECONDS + 2
    while (slow_smtp.closed_at is None or server.closed_at is None) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert slow_smtp.closed_at is not None and slow_smtp.closed_at - returned < 2
    assert server.closed_at is not None and server.closed_at - returned < 2


# --------------------------------------------------------------------------- the run deadline
def test_run_deadline_is_the_average_runtime_plus_a_margin_unless_a_fixed_limit_is_set():
    from datetime import timedelta

    from airflow.sdk import AsyncCallback
    from airflow.sdk.definitions.deadline import AverageRuntimeDeadline, DagRunQueuedAtDeadline

    average = alerts.run_deadline({})
    assert isinstance(average.reference, AverageRuntimeDeadline)
    assert (average.reference.max_runs, average.reference.min_runs) == (alerts.AVERAGE_RUNS, alerts.MIN_AVERAGE_RUNS)
    assert average.interval == timedelta(minutes=alerts.DEFAULT_RUN_DEADLINE_MARGIN_MINUTES)
    assert alerts.run_deadline({alerts.RUN_DEADLINE_MARGIN_ENV: "15"}).interval == timedelta(minutes=15)
    fixed = alerts.run_deadline({alerts.RUN_DEADLINE_ENV: "90", alerts.RUN_DEADLINE_MARGIN_ENV: "15"})
    assert isinstance(fixed.reference, DagRunQueuedAtDeadline) and fixed.interval == timedelta(minutes=90)
    assert isinstance(fixed.callback, AsyncCallback)
    assert fixed.callback.path == "alexnet_tasks.ops.alerts.run_deadline_missed"
    for bad in ("ten", "0", "-5", "inf", "nan"):
        with pytest.raises(ValueError, match=rf"{alerts.RUN_DEADLINE_ENV}='{bad}'"):
            alerts.run_deadline({alerts.RUN_DEADLINE_ENV: bad})


def test_the_dag_carries_the_run_deadline_as_the_scheduler_reads_it(monkeypatch):
    code = (
        "import json\n"
        "from airflow.dag_processing.dagbag import DagBag\n"
        "from airflow.serialization.serialized_objects import DagSerialization\n"
        f"dag = DagBag({str(Path(__file__).resolve().parent.parent / 'dags')!r}).dags['alexnet_cifar10']\n"
        "print(json.dumps(DagSerialization.to_dict(dag)['dag']['deadline']))\n"
    )
    env = {**__import__("os").environ, alerts.RUN_DEADLINE_ENV: "0.5"}
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert run.returncode == 0, run.stderr[-3000:]
    [deadline] = json.loads(run.stdout.splitlines()[-1])
    assert deadline["reference"]["reference_type"] == "DagRunQueuedAtDeadline"
    assert deadline["interval"]["__data__"] == 30.0
    assert deadline["callback"]["__data__"]["path"] == "alexnet_tasks.ops.alerts.run_deadline_missed"
