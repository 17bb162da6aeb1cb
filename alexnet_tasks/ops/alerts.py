"""Alerts: a failed task or a model the gate did not bless, by e-mail and/or webhook.

Both go through one Airflow notifier (``AlertNotifier``, a
``airflow.sdk.BaseNotifier``): the DAG sets it as every task's
``on_failure_callback``, and the step that refuses a model calls
``notify_not_blessed``. Channels come from the environment of the process
that sends (the worker), read when an alert is sent:

* ``ALEXNET_ALERT_EMAIL``: recipients, separated by commas or semicolons;
  mail goes through the SMTP provider's ``SmtpHook`` and the Airflow
  connection ``ALEXNET_ALERT_SMTP_CONN`` (default ``smtp_default``; define
  it in the UI, a secrets backend or an ``AIRFLOW_CONN_<ID>`` variable).
  ``ALEXNET_ALERT_FROM`` sets the sender (else the connection's
  ``from_email`` extra, else ``alexnet-cifar10@<host>``).
* ``ALEXNET_ALERT_WEBHOOK``: an http(s) URL that gets the alert as a JSON
  POST.

With neither set, alerts are off: the notifier logs one line and sends
nothing. The channels send at the same time, each in a thread of its own,
under one deadline for the whole send (``ALERT_DEADLINE_SECONDS``, 10 s:
connecting, every byte sent and every byte of the answer): a channel still
sending then is logged as failed, its connection is shut, and the alert
returns, so an alert never holds its task longer than the deadline. A
channel that fails is logged and never fails the task or the other channel. This module imports Airflow only when an alert is sent or
the notifier is built.
"""

from __future__ import annotations

import functools
import html
import json
import logging
import os
import re
import socket
import threading
import time
import urllib.request
from dataclasses import dataclass, field

log = logging.getLogger(__name__)

EMAIL_ENV = "ALEXNET_ALERT_EMAIL"
SMTP_CONN_ENV = "ALEXNET_ALERT_SMTP_CONN"
FROM_ENV = "ALEXNET_ALERT_FROM"
WEBHOOK_ENV = "ALEXNET_ALERT_WEBHOOK"
DEFAULT_SMTP_CONN = "smtp_default"
DEFAULT_DAG_ID = "alexnet_cifar10"
# One deadline for the whole send of an alert on every channel (they send at the same time).
ALERT_DEADLINE_SECONDS = 10.0


@dataclass(frozen=True)
class AlertSettings:
    """Where alerts go; ``enabled`` is False when no channel is configured."""

    recipients: tuple[str, ...] = ()
    smtp_conn_id: str = DEFAULT_SMTP_CONN
    from_email: str | None = None
    webhook_url: str | None = None
    deadline_seconds: float = ALERT_DEADLINE_SECONDS

    @property
    def enabled(self) -> bool:
        return bool(self.recipients or self.webhook_url)

    @classmethod
    def from_env(cls, environ: dict | None = None) -> AlertSettings:
        env = os.environ if environ is None else environ
        recipients = tuple(part for part in re.split(r"\s*[,;]\s*", env.get(EMAIL_ENV, "").strip()) if part)
        webhook = env.get(WEBHOOK_ENV, "").strip() or None
        if webhook is not None and not webhook.startswith(("http://", "https://")):
            raise ValueError(f"{WEBHOOK_ENV}={webhook!r}: expected an http:// or https:// URL")
        return cls(
            recipients=recipients,
            smtp_conn_id=env.get(SMTP_CONN_ENV, "").strip() or DEFAULT_SMTP_CONN,
            from_email=env.get(FROM_ENV, "").strip() or None,
            webhook_url=webhook,
        )


@dataclass(frozen=True)
class Alert:
    """One alert: a subject, a plain-text body, and the same facts as a JSON-ready dict."""

    subject: str
    text: str
    payload: dict = field(default_factory=dict)


SUBJECT_LENGTH = 200


def _subject(text: str) -> str:
    """One header line: no line breaks, at most ``SUBJECT_LENGTH`` characters."""
    text = " ".join(text.split())
    return text if len(text) <= SUBJECT_LENGTH else text[: SUBJECT_LENGTH - 3] + "..."


def _lines(facts: dict) -> str:
    return "\n".join(f"{key}: {value}" for key, value in facts.items())


def failure_alert(context) -> Alert:
    """The alert for a task that failed, from the Airflow context its ``on_failure_callback`` gets."""
    ti = context.get("ti") or context.get("task_instance")
    dag_run = context.get("dag_run")
    dag = context.get("dag")
    dag_id = getattr(ti, "dag_id", None) or getattr(dag, "dag_id", None) or DEFAULT_DAG_ID
    run_id = context.get("run_id") or getattr(ti, "run_id", None) or getattr(dag_run, "run_id", None)
    task_id = getattr(ti, "task_id", None) or getattr(context.get("task"), "task_id", None)
    try_number = getattr(ti, "try_number", None)
    max_tries = getattr(ti, "max_tries", None)
    error = context.get("exception")
    if error is None:
        error_text = "no exception was recorded (the task process was killed or lost its heartbeat)"
    elif isinstance(error, BaseException):
        error_text = f"{type(error).__name__}: {error}"
    else:
        error_text = str(error)
    try:
        log_url = getattr(ti, "log_url", None)
    except Exception:  # the URL needs configuration that a bare context may lack
        log_url = None
    tries = f"{try_number}" if max_tries is None else f"{try_number} of {max_tries + 1}"
    facts = {"DAG": dag_id, "run": run_id, "task": task_id, "try": tries, "error": error_text}
    if log_url:
        facts["log"] = log_url
    return Alert(
        subject=_subject(f"[{dag_id}] task {task_id} failed in run {run_id} (try {tries})"),
        text=f"The task {task_id} of {dag_id} failed after its last try.\n\n{_lines(facts)}\n",
        payload={"event": "task_failed", "dag_id": dag_id, "run_id": run_id, "task_id": task_id,
                 "try_number": try_number, "max_tries": max_tries, "error": error_text, "log_url": log_url},
    )


def not_blessed_alert(decision: dict, run_id: str, dag_id: str = DEFAULT_DAG_ID, task_id: str | None = None,
                      try_number: int | None = None) -> Alert:
    """The alert for a model the gate refused: ``decision`` as the gate wrote it to ``decision.json``.

    Its ``reasons``, joined, make the alert's ``reason``; the test accuracy, the
    champion, its accuracy and the paired comparison are added when present.
    """
    reasons = decision.get("reasons")
    reason = "; ".join(str(item) for item in reasons) if isinstance(reasons, list) and reasons else "no reason given"
    facts = {"DAG": dag_id, "run": run_id, "task": task_id, "try": try_number, "reason": reason}
    for key in ("test_accuracy", "champion", "champion_accuracy", "publish_mode"):
        if decision.get(key) is not None:
            facts[key] = decision[key]
    paired = decision.get("paired")
    if isinstance(paired, dict):
        facts["paired"] = (f"only this model right on {paired.get('only_challenger_right')} images, only the "
                           f"champion on {paired.get('only_champion_right')}, McNemar p={paired.get('mcnemar_p')}")
    return Alert(
        subject=_subject(f"[{dag_id}] model of run {run_id} not blessed: {reason}"),
        text=(f"The model trained by run {run_id} was not blessed; it is recorded but not published as "
              f"latest.\n\n{_lines(facts)}\n"),
        payload={"event": "model_not_blessed", "dag_id": dag_id, "run_id": run_id, "task_id": task_id,
                 "try_number": try_number, "reason": reason, "decision": decision},
    )


def _send_email(alert: Alert, settings: AlertSettings, sockets: list) -> None:
    """Mail ``alert`` through the SMTP connection; the client's socket goes into ``sockets`` once connected."""
    from airflow.providers.smtp.hooks.smtp import SmtpHook

    body = f"<pre>{html.escape(alert.text)}</pre>"
    with SmtpHook(smtp_conn_id=settings.smtp_conn_id) as hook:
        client = getattr(hook, "_smtp_client", None)  # the hook's smtplib client (as its test_connection reads it)
        if getattr(client, "sock", None) is not None:
            sockets.append(client.sock)
        sender = settings.from_email or hook.from_email or f"{DEFAULT_DAG_ID}@{socket.getfqdn()}"
        hook.send_email_smtp(to=list(settings.recipients), from_email=sender, subject=alert.subject,
                             html_content=body)


def _recording(connection_class: type, sockets: list) -> type:
    """``connection_class`` that puts each socket it connects into ``sockets`` (so it can be shut)."""

    class Recording(connection_class):
        def connect(self):
            super().connect()
            sockets.append(self.sock)

    return Recording


def _send_webhook(alert: Alert, url: str, timeout: float, sockets: list) -> None:
    """POST ``alert`` as JSON to ``url`` (proxies as urllib finds them); its sockets go into ``sockets``."""
    import http.client

    class Http(urllib.request.HTTPHandler):
        def http_open(self, request):
            return self.do_open(_recording(http.client.HTTPConnection, sockets), request)

    class Https(urllib.request.HTTPSHandler):
        def https_open(self, request):
            return self.do_open(_recording(http.client.HTTPSConnection, sockets), request, context=self._context)

    data = json.dumps({**alert.payload, "subject": alert.subject, "text": alert.text}, default=str).encode()
    request = urllib.request.Request(url, data=data, method="POST",
                                     headers={"Content-Type": "application/json"})
    with urllib.request.build_opener(Http, Https).open(request, timeout=timeout) as response:
        response.read()


def _shut(sockets: list) -> None:
    """Shut every socket of a late channel: its blocked reads and writes end at once."""
    for sock in sockets:
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:  # already closed
            pass


def _run(send, sockets: list, result: dict) -> None:
    try:
        send(sockets)
    except BaseException as error:  # noqa: BLE001 - handed to deliver(), which logs it
        result["error"] = error


def deliver(alert: Alert, settings: AlertSettings | None = None) -> dict[str, str]:
    """Send ``alert`` on every configured channel; returns ``{channel: "sent" or the error}``.

    The channels send at the same time, each in a daemon thread, under one
    deadline for the whole send (``settings.deadline_seconds``, default
    ``ALERT_DEADLINE_SECONDS``): a channel not done by then is logged as
    failed (``"TimeoutError: ..."``), its sockets are shut, and this returns,
    so it takes at most the deadline (plus thread start-up). A failing
    channel is logged, never raised: an alert must not fail the task that
    sends it, nor stop the other channel.
    """
    if settings is None:
        try:
            settings = AlertSettings.from_env()
        except ValueError as error:
            log.error("alert %r not sent: %s", alert.subject, error)
            return {"settings": str(error)}
    if not settings.enabled:
        log.info("alerts are off (set %s and/or %s): not sending %r", EMAIL_ENV, WEBHOOK_ENV, alert.subject)
        return {}
    seconds = settings.deadline_seconds
    deadline = time.monotonic() + seconds
    channels = []
    if settings.recipients:
        channels.append(("email", lambda sockets: _send_email(alert, settings, sockets)))
    if settings.webhook_url:
        channels.append(("webhook", lambda sockets: _send_webhook(alert, settings.webhook_url, seconds, sockets)))
    sending = []
    for name, send in channels:
        sockets, result = [], {}
        thread = threading.Thread(target=_run, args=(send, sockets, result), name=f"alert-{name}", daemon=True)
        thread.start()
        sending.append((name, thread, sockets, result))
    outcome = {}
    for name, thread, sockets, result in sending:
        thread.join(max(deadline - time.monotonic(), 0.0))
        if thread.is_alive():
            _shut(sockets)
            outcome[name] = f"TimeoutError: not delivered within the {seconds:g} s deadline; abandoned"
            log.error("alert %r: %s delivery failed: %s", alert.subject, name, outcome[name])
        elif "error" in result:
            error = result["error"]
            log.error("alert %r: %s delivery failed", alert.subject, name, exc_info=error)
            outcome[name] = f"{type(error).__name__}: {error}"
        else:
            outcome[name] = "sent"
    log.info("alert %r: %s", alert.subject, ", ".join(f"{name} {state}" for name, state in outcome.items()))
    return outcome


@functools.cache
def _notifier_class():
    from airflow.sdk import BaseNotifier

    class AlertNotifier(BaseNotifier):
        """Sends a failure alert for the context it is called with, or the fixed ``alert`` it was given.

        Nothing is templated: task errors and gate reasons go out verbatim.
        """

        template_fields = ()

        def __init__(self, alert: Alert | None = None, settings: AlertSettings | None = None):
            super().__init__()
            self.alert = alert
            self.settings = settings
            self.outcome: dict[str, str] = {}

        def notify(self, context) -> None:
            alert = self.alert if self.alert is not None else failure_alert(context)
            self.outcome = deliver(alert, self.settings)

    AlertNotifier.__module__ = __name__
    AlertNotifier.__qualname__ = "AlertNotifier"
    return AlertNotifier


def __getattr__(name: str):
    if name == "AlertNotifier":  # built on first use, so importing this module never imports Airflow
        return _notifier_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def failure_notifier(settings: AlertSettings | None = None):
    """The ``on_failure_callback`` for every task: alerts when configured, a logged no-op otherwise."""
    return _notifier_class()(settings=settings)


def _current_task() -> tuple[str | None, str | None, int | None]:
    """(dag_id, task_id, try_number) of the running Airflow task, Nones outside one."""
    try:
        from airflow.sdk import get_current_context

        ti = get_current_context()["ti"]
    except Exception:  # noqa: BLE001 - called outside a task (a script, a test)
        return None, None, None
    return ti.dag_id, ti.task_id, ti.try_number


def notify_not_blessed(decision: dict, run_id: str, *, dag_id: str | None = None, task_id: str | None = None,
                       try_number: int | None = None, settings: AlertSettings | None = None) -> dict[str, str]:
    """Alert that the model of ``run_id`` was not blessed, with the gate's reason; returns the outcome per channel.

    Inside an Airflow task, the DAG, task and try number default to the running
    task's. Sends through ``AlertNotifier``; never raises on delivery.
    """
    current_dag, current_task, current_try = _current_task()
    alert = not_blessed_alert(decision, run_id, dag_id or current_dag or DEFAULT_DAG_ID,
                              task_id or current_task, try_number if try_number is not None else current_try)
    notifier = _notifier_class()(alert=alert, settings=settings)
    notifier({"run_id": run_id})
    return notifier.outcome


# --------------------------------------------------------------------------- the run deadline
# A fixed limit for a whole DAG run, in minutes from when it was queued (fractions allowed); unset:
# the recent average runtime plus RUN_DEADLINE_MARGIN_ENV minutes.
RUN_DEADLINE_ENV = "ALEXNET_RUN_DEADLINE_MINUTES"
RUN_DEADLINE_MARGIN_ENV = "ALEXNET_RUN_DEADLINE_MARGIN_MINUTES"
DEFAULT_RUN_DEADLINE_MARGIN_MINUTES = 60.0
# The average is taken over the last AVERAGE_RUNS finished runs, and only once MIN_AVERAGE_RUNS have finished.
AVERAGE_RUNS = 10
MIN_AVERAGE_RUNS = 3


def _minutes(environ, name: str, default: float | None) -> float | None:
    text = environ.get(name, "").strip()
    if not text:
        return default
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not value > 0 or value == float("inf"):
        raise ValueError(f"{name}={text!r}: expected a number of minutes above 0")
    return value


def run_deadline(environ: dict | None = None):
    """The DAG's ``DeadlineAlert``: alert when a run has not finished in time.

    With ``ALEXNET_RUN_DEADLINE_MINUTES`` set, a run is late that many
    minutes after it was queued. Otherwise it is late
    ``ALEXNET_RUN_DEADLINE_MARGIN_MINUTES`` (default 60) after the average
    runtime of the DAG's last ``AVERAGE_RUNS`` finished runs (counted from
    when it was created); while fewer than ``MIN_AVERAGE_RUNS`` have finished
    a run has no deadline. The scheduler checks deadlines; the triggerer
    runs ``run_deadline_missed``. Raises ValueError naming the variable for a
    value that is not a positive number of minutes.
    """
    from datetime import timedelta

    from airflow.sdk import AsyncCallback, DeadlineAlert, DeadlineReference

    env = os.environ if environ is None else environ
    fixed = _minutes(env, RUN_DEADLINE_ENV, None)
    callback = AsyncCallback(run_deadline_missed)
    if fixed is not None:
        return DeadlineAlert(reference=DeadlineReference.DAGRUN_QUEUED_AT, interval=timedelta(minutes=fixed),
                             callback=callback, name="run deadline (fixed)")
    margin = _minutes(env, RUN_DEADLINE_MARGIN_ENV, DEFAULT_RUN_DEADLINE_MARGIN_MINUTES)
    return DeadlineAlert(reference=DeadlineReference.AVERAGE_RUNTIME(max_runs=AVERAGE_RUNS, min_runs=MIN_AVERAGE_RUNS),
                         interval=timedelta(minutes=margin), callback=callback, name="run deadline (average runtime)")


def deadline_alert(context: dict) -> Alert:
    """The alert for a run past its deadline, from the context Airflow gives a deadline callback.

    ``context["dag_run"]`` is the run as the REST API describes it,
    ``context["deadline"]["deadline_time"]`` when it was due.
    """
    dag_run = context.get("dag_run") or {}
    deadline = context.get("deadline") or {}
    dag_id = dag_run.get("dag_id") or DEFAULT_DAG_ID
    run_id = dag_run.get("dag_run_id") or dag_run.get("run_id")
    due = deadline.get("deadline_time")
    facts = {"DAG": dag_id, "run": run_id, "state": dag_run.get("state"), "due": due,
             "queued": dag_run.get("queued_at"), "started": dag_run.get("start_date")}
    return Alert(
        subject=_subject(f"[{dag_id}] run {run_id} has not finished by its deadline {due}"),
        text=f"The run {run_id} of {dag_id} was still {dag_run.get('state')} at its deadline.\n\n{_lines(facts)}\n",
        payload={"event": "deadline_missed", "dag_id": dag_id, "run_id": run_id, "state": dag_run.get("state"),
                 "deadline": None if due is None else str(due), "queued_at": dag_run.get("queued_at"),
                 "start_date": dag_run.get("start_date")},
    )


async def run_deadline_missed(context: dict | None = None, **kwargs) -> dict[str, str]:
    """The deadline's callback (run by the triggerer): send ``deadline_alert`` on the alert channels."""
    import asyncio

    alert = deadline_alert(context or {})
    return await asyncio.to_thread(deliver, alert)
