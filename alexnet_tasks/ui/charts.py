"""Inline SVG charts for the results pages: no JavaScript, no matplotlib, no NumPy.

``line_chart`` draws ``(label, [(x, y), ...])`` series; ``accuracy_over_time``
and ``training_curves`` are the two the pages show.
"""

from __future__ import annotations

import html
import json
import math
from datetime import datetime, timezone

from markupsafe import Markup


def _number(value) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


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
    lines: bool = True,
    x_ticks_at: list[float] | None = None,
) -> Markup:
    """An SVG line chart of ``(label, [(x, y), ...])`` series; points with a None y are left out.

    ``lines=False`` draws the points alone (a scatter plot); ``x_ticks_at``
    puts the x ticks there rather than at the data's values.
    """
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
    x_ticks = x_ticks_at if x_ticks_at is not None else unique_x if len(unique_x) <= 6 else _ticks(x_low, x_high, 5)
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
        if lines:
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
        legend_x = left + min(150, plot_w // len(series)) * number  # one row of legend entries above the plot
        parts.append(f'<line x1="{legend_x}" x2="{legend_x + 18}" y1="28" y2="28" stroke="{color}" stroke-width="3"/>')
        parts.append(f'<text x="{legend_x + 24}" y="32" class="legend">{html.escape(label)}</text>')
    parts.append("</svg>")
    return Markup("".join(parts))


def _timestamp(text: str) -> float | None:
    try:
        return datetime.fromisoformat(text).timestamp()
    except (TypeError, ValueError):
        return None


def accuracy_over_time(runs: list) -> Markup:
    """Test accuracy of ``runs`` (view models of ``alexnet_tasks.ui.runs``, newest first) against when they were published."""
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


def compared_curves(first: list, second: list, first_label: str = "A", second_label: str = "B") -> tuple[Markup, Markup]:
    """Loss and accuracy per epoch of two runs on one chart each: training and validation of both."""
    def series(history, key):
        entries = [entry for entry in history if isinstance(entry, dict)]
        return [(float(entry.get("epoch", index + 1)), _number(entry.get(key))) for index, entry in enumerate(entries)]

    def chart(key, title, y_label, **formats):
        return line_chart(
            [(f"{first_label} train", series(first, key)), (f"{first_label} validation", series(first, f"val_{key}")),
             (f"{second_label} train", series(second, key)), (f"{second_label} validation", series(second, f"val_{key}"))],
            title, "epoch", y_label, css_class="chart curves", **formats,
        )

    return (chart("loss", "Loss per epoch", "loss"),
            chart("accuracy", "Accuracy per epoch", "accuracy", y_format=lambda value: f"{value:.0%}"))


def setting_chart(name: str, points: list[tuple], chosen: int | None = None) -> Markup:
    """Validation accuracy against one swept setting: ``points`` are ``(value, accuracy)``, one per trial.

    Numbers go on a numeric axis, anything else (text, true/false) on one
    tick per distinct value in order of appearance; the chosen trial's point
    (its position in ``points``) is drawn larger.
    """
    numeric = all(_number(value) is not None for value, _ in points)
    if numeric:
        data = [(float(value), _number(accuracy)) for value, accuracy in points]
        x_format, ticks = (lambda value: f"{value:g}"), None
    else:
        names: list[str] = []
        for value, _ in points:
            text = value if isinstance(value, str) else json.dumps(value)
            if text not in names:
                names.append(text)
        data = [(float(names.index(value if isinstance(value, str) else json.dumps(value))), _number(accuracy))
                for value, accuracy in points]
        ticks = [float(index) for index in range(len(names))]
        x_format = lambda value: names[int(round(value))] if 0 <= round(value) < len(names) else ""  # noqa: E731
    shown = [index for index, (_, accuracy) in enumerate(data) if accuracy is not None]
    highlight = shown.index(chosen) if chosen in shown else None
    return line_chart(
        [("validation accuracy", data)], f"Validation accuracy against {name}", name, "validation accuracy",
        x_format=x_format, y_format=lambda value: f"{value:.1%}", css_class="chart sweep", highlight=highlight,
        lines=False, x_ticks_at=ticks,
    )
