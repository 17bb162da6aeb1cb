"""A person's approval of the gate's blessing (``publish_mode=approval``): the request, the answer, its effect.

With ``publish_mode=approval`` a run the gate blesses waits, between gate and
publish, for Approve or Reject in Airflow's Required actions (a
human-in-the-loop task). ``request`` words the question from the gate's
``decision.json``; ``record`` writes the answer as ``approval.json`` in the
run folder (copied into the published run); publish reads it back
(``read``) and ``apply`` turns it into what publish does: Approve promotes,
Reject or no answer before ``approval_timeout`` keeps the champion (fails
closed), and a blessed run without any ``approval.json`` is not promoted either.

``approval.json``: ``outcome`` (``approved``, ``rejected`` or
``timed_out``), ``approved`` (bool), ``user`` (who answered; None on a
timeout), ``decided_at`` (ISO 8601 UTC), ``comment`` (the answer's words or
None), ``fingerprint`` (of the training the gate decided on), ``dag_id`` and
``dag_run_id``. Imports nothing heavy.
"""

from __future__ import annotations

from pathlib import Path
from urllib.parse import quote, urlencode

from alexnet_tasks.jsonio import load_json_object, save_json
from alexnet_tasks.layout import APPROVAL

OUTCOMES = ("approved", "rejected", "timed_out")
# Where the results plugin is mounted under the Airflow UI (plugins/alexnet_results.py's URL_PREFIX).
PLUGIN_PATH = "alexnet"


def _percent(value) -> str:
    return "unknown" if value is None else f"{value:.2%}"


def links(run_id: str, champion: str | None, base_path: str = "/") -> dict[str, str]:
    """Relative links (no host) to the run's results page and to its comparison with ``champion``.

    ``base_path`` is the path Airflow's UI is served under (``[api] base_url``'s path, ``/`` by default).
    """
    root = base_path.rstrip("/") + f"/{PLUGIN_PATH}/"
    found = {"run": root + "runs/" + quote(run_id, safe="")}
    if champion is not None:
        found["compare"] = root + "compare?" + urlencode({"a": run_id, "b": champion})
    return found


def request(decision: dict, run_id: str, timeout_hours: float, base_path: str = "/") -> tuple[str, str]:
    """The subject and the Markdown body of the question asked in Required actions.

    The body carries the gate's figures from ``decision`` (``decision.json``):
    the run's accuracy against the champion's, the images only one of them
    gets right, the McNemar p-value, and relative links to the run's page and
    to the comparison with the champion.
    """
    champion = decision.get("champion")
    found = links(run_id, champion, base_path)
    subject = f"Make {run_id} the champion?"
    lines = [f"The gate blessed **{run_id}**: test accuracy {_percent(decision.get('compared_accuracy'))}"
             + (f" ({decision['compared_as']} views)" if decision.get("compared_as") not in (None, "none") else "")
             + "."]
    if champion is None:
        lines.append("There is no champion yet.")
    else:
        lines.append(f"Champion **{champion}**: {_percent(decision.get('champion_accuracy'))}.")
        paired = decision.get("paired")
        if paired:
            lines.append(f"On {paired['images']} test images: {paired['only_challenger_right']} right only by "
                         f"this run, {paired['only_champion_right']} only by the champion; "
                         f"McNemar p = {paired['mcnemar_p']:.3g}.")
        else:
            lines.append("The champion has no per-image predictions: compared by accuracy alone.")
    lines.append("Why the gate blessed it: " + "; ".join(decision.get("reasons") or []) + ".")
    lines.append(f"[The run's results]({found['run']})"
                 + (f" · [compared with the champion]({found['compare']})" if "compare" in found else ""))
    lines.append(f"**Approve** makes it the champion. **Reject**, or no answer within {timeout_hours:g} h, "
                 "keeps the champion; the run is recorded either way.")
    return subject, "\n\n".join(lines)


def record(run_dir: Path, outcome: str, *, decided_at: str, user: str | None, comment: str | None,
           fingerprint: str | None, dag_id: str | None, dag_run_id: str | None) -> dict:
    """Write ``approval.json`` in ``run_dir`` (atomically) and return it.

    ``outcome`` is one of ``OUTCOMES``; ``approved`` and ``rejected`` need
    the ``user`` who answered. Raises ValueError otherwise.
    """
    if outcome not in OUTCOMES:
        raise ValueError(f"approval outcome {outcome!r}: expected one of {', '.join(OUTCOMES)}")
    if outcome != "timed_out" and not (isinstance(user, str) and user):
        raise ValueError(f"approval outcome {outcome!r} needs the name of the user who answered")
    approval = {
        "outcome": outcome,
        "approved": outcome == "approved",
        "user": user,
        "decided_at": decided_at,
        "comment": comment or None,
        "fingerprint": fingerprint,
        "dag_id": dag_id,
        "dag_run_id": dag_run_id,
    }
    save_json(Path(run_dir) / APPROVAL, approval)
    return approval


def read(run_dir: Path) -> dict | None:
    """``approval.json`` of ``run_dir``, checked; None when the run has none.

    Raises ValueError naming the file when ``outcome`` or ``approved`` is not what ``record`` writes.
    """
    path = Path(run_dir) / APPROVAL
    if not path.is_file():
        return None
    approval = load_json_object(path)
    if approval.get("outcome") not in OUTCOMES or approval.get("approved") is not (approval["outcome"] == "approved"):
        raise ValueError(f"{path}: expected outcome one of {', '.join(OUTCOMES)} and approved true exactly when "
                         f"approved, got outcome {approval.get('outcome')!r}, approved {approval.get('approved')!r}")
    return approval


def in_words(approval: dict | None, timeout_hours: float | None = None) -> str:
    """One sentence: who decided what, when, and why."""
    if approval is None:
        return "no approval recorded: the champion stays"
    comment = f": {approval['comment']}" if approval.get("comment") else ""
    if approval["outcome"] == "approved":
        return f"approved by {approval['user']} at {approval['decided_at']}{comment}"
    if approval["outcome"] == "rejected":
        return f"rejected by {approval['user']} at {approval['decided_at']}{comment}; the champion stays"
    limit = f" within {timeout_hours:g} h" if timeout_hours is not None else ""
    return f"no answer{limit} (timed out at {approval['decided_at']}); the champion stays"


def apply(decision: dict | None, approval: dict | None, run_dir: Path) -> dict | None:
    """The decision publish follows: ``decision`` as the gate made it, unless approval was asked for.

    In ``publish_mode=approval`` a blessed run stays blessed only when
    ``approval`` approved it (its reasons then end with who approved it);
    otherwise (rejected, timed out, or no ``approval.json``) it is not
    blessed and its reasons say why. Raises ValueError when ``approval`` was
    given for another training than the decision's.
    """
    if decision is None or decision.get("publish_mode") != "approval" or not decision["blessed"]:
        return decision
    if approval is not None and None not in (approval.get("fingerprint"), decision.get("fingerprint")) \
            and approval["fingerprint"] != decision["fingerprint"]:
        raise ValueError(f"{Path(run_dir) / APPROVAL}: given for another training (fingerprint "
                         f"{approval['fingerprint']}) than the gate's decision ({decision['fingerprint']}); "
                         "run the gate and the approval again")
    words = in_words(approval, decision.get("approval_timeout"))
    if approval is not None and approval["approved"]:
        return {**decision, "reasons": [*decision.get("reasons", []), words]}
    return {**decision, "blessed": False, "reasons": [f"blessed by the gate but {words}"]}
