"""SVG charts for the eval report (grouped bars per model, training-loss curves) and for an
experiment (each seed's run per grid point, `seeds_chart`), as strings.

    from pathlib import Path
    from liandan.plots import bar_chart, loss_chart, model_colours
    result = {"models": ["default", "runs/extract"], "labels": {"default": "before", "runs/extract": "after"}}
    colours = model_colours(result)
    bars = bar_chart("Task", {"schema-valid": {"default": 0.0, "runs/extract": 0.95}}, "percent", result, colours)
    curve = [{"step": 1, "loss": 2.4}, {"step": 2, "loss": 1.9, "eval_loss": 2.0}, {"step": 3, "loss": 1.6}]
    loss = loss_chart("runs/extract", curve, result, colours["runs/extract"])
    Path("plots.html").write_text(f"<!doctype html><meta charset=utf-8>{bars}{loss}", encoding="utf-8")

Each chart is one self-contained ``<svg>`` (no script, nothing fetched), or "" when there is
nothing to draw; every label that comes from `result` is escaped. The value helpers and colours
live here too: `liandan.eval_report` uses them in its tables and imports them from this module,
so the two modules never import each other.
"""

from __future__ import annotations

import math
import unicodedata
from html import escape

# Tableau 10: distinct, colour-blind friendly, and none of them is the delta green/red or grey.
PALETTE = ("#4e79a7", "#f28e2b", "#59a14f", "#e15759", "#b07aa1", "#76b7b2", "#edc948", "#9c755f")
EVAL_COLOUR = "#1f2937"  # outside the palette, so eval loss never reads as another model
DASH = "—"
MINUS = "\u2212"


# ---------------------------------------------------------------------------------------------
# Values, shared with eval_report's tables


def finite_number(value) -> float | None:
    """A finite float, or None for null, NaN, infinities and non-numbers (nothing to show)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def three_digits(v: float) -> str:
    """Three significant digits without exponents for everyday sizes: 2.31, 23.1, 0.0421, 1234."""
    if v == 0:
        return "0"
    if abs(v) < 1e-4:
        return f"{v:.2e}"
    rounded = float(f"{v:.3g}")  # the decimals follow the rounded value: 9.999 is "10.0", not "10.00"
    return f"{v:.{max(0, 2 - math.floor(math.log10(abs(rounded))))}f}"


def format_value(value, fmt: str | None) -> str:
    v = finite_number(value)
    if v is None:
        return DASH
    return f"{v * 100:.1f}%" if fmt == "percent" else three_digits(v)


def model_label(result: dict, model: str) -> str:
    return (result.get("labels") or {}).get(model) or model


def model_colours(result: dict) -> dict[str, str]:
    """One colour per model, the same in every chart; models seen only in curves or bars too."""
    names = list(result.get("models") or [])
    names += list(result.get("curves") or {})
    for chart in result.get("bars") or []:
        for values in (chart.get("groups") or {}).values():
            names += list(values or {})
    colours: dict[str, str] = {}
    for name in names:
        if name not in colours:
            i = len(colours)
            colours[name] = PALETTE[i] if i < len(PALETTE) else f"hsl({i * 137.5 % 360:.0f},55%,45%)"
    return colours


# ---------------------------------------------------------------------------------------------
# SVG plots: sizes are in viewBox units, which the page shows at one CSS pixel each when it fits.

LEFT, RIGHT, BOTTOM = 56, 16, 44
FONT = 12


def _text_width(text: str, size: float = FONT) -> float:
    """Rough rendered width, enough to lay out legends: CJK characters are twice as wide."""
    return sum(size * (1.0 if unicodedata.east_asian_width(c) in "WF" else 0.6) for c in text)


def _ticks(lo: float, hi: float, count: int = 5, integer: bool = False) -> list[float]:
    """Round tick values (1, 2 or 5 times a power of ten apart) that cover [lo, hi]."""
    if hi <= lo:  # one point, or all values equal: give the axis some height around it
        pad = abs(lo) * 0.1 or 1.0
        lo, hi = lo - pad, hi + pad
    raw = (hi - lo) / count
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 5, 10) if m * magnitude >= raw)
    if integer:
        step = max(step, 1)
    start = math.floor(lo / step) * step
    n = round((math.ceil(hi / step) * step - start) / step)
    return [start + i * step for i in range(n + 1)]


def _tick_text(value: float, step: float, fmt: str | None = None) -> str:
    if fmt == "percent":
        return f"{value * 100:.0f}%"
    text = f"{value:.{max(0, -math.floor(math.log10(step) + 1e-9))}f}"
    return "0" if text.strip("-0.") == "" else text.replace("-", MINUS)


def _scale(d0: float, d1: float, r0: float, r1: float):
    return lambda v: r0 + (v - d0) / (d1 - d0) * (r1 - r0)


def _svg(width: float, height: float, label: str, body: list[str]) -> str:
    return (
        f'<svg class="plot" viewBox="0 0 {width:.0f} {height:.0f}" width="{width:.0f}" height="{height:.0f}" '
        f'role="img" aria-label="{escape(label)}" font-size="{FONT}" fill="#374151">' + "".join(body) + "</svg>"
    )


def _legend(items: list[tuple[str, str, str]], width: float) -> tuple[list[str], float]:
    """Items ``(label, colour, shape)`` laid out in rows from the top left; returns (svg, height)."""
    out, x, y = [], LEFT, 14
    for label, colour, shape in items:
        w = 22 + _text_width(label) + 18
        if x + w > width and x > LEFT:
            x, y = LEFT, y + 18
        if shape == "bar":
            out.append(f'<rect x="{x}" y="{y - 9}" width="12" height="12" rx="2" fill="{colour}"/>')
        elif shape == "line":
            out.append(f'<line x1="{x}" x2="{x + 14}" y1="{y - 3}" y2="{y - 3}" stroke="{colour}" stroke-width="2.5"/>')
        else:
            out.append(f'<circle cx="{x + 7}" cy="{y - 3}" r="4" fill="{colour}"/>')
        out.append(f'<text x="{x + 20}" y="{y + 1}">{escape(label)}</text>')
        x += w
    return out, y + 14


def _y_grid(ticks: list[float], y, right: float, fmt: str | None = None) -> list[str]:
    step = ticks[1] - ticks[0]
    out = []
    for t in ticks:
        out.append(f'<line x1="{LEFT}" x2="{right}" y1="{y(t):.1f}" y2="{y(t):.1f}" stroke="#e5e7eb"/>')
        out.append(f'<text x="{LEFT - 6}" y="{y(t) + 4:.1f}" text-anchor="end">{_tick_text(t, step, fmt)}</text>')
    return out


def _wrap(text: str, max_width: float, lines: int = 3) -> list[str]:
    """Split a label into at most `lines` lines that fit `max_width`; the last one ends in … if cut."""
    out, current = [], ""
    for word in text.split():
        if current and _text_width(current + " " + word) > max_width:
            out.append(current)
            current = word
        else:
            current = f"{current} {word}".strip()
    out.append(current)
    if len(out) > lines:
        out = out[: lines - 1] + [" ".join(out[lines - 1 :])]
    last = out[-1]
    while _text_width(last) > max_width and len(last) > 1:
        last = last[:-2] + "…"
    return out[:-1] + [last]


def bar_chart(title: str, groups: dict, fmt: str | None, result: dict, colours: dict[str, str],
              whiskers: dict | None = None) -> str:  # fmt: skip
    """Grouped bars, one group per category or metric and one bar per model; "" if nothing to draw.
    ``whiskers`` ({group: {model: (low, high)}}, optional) draws a range on a bar, such as where
    the value could lie given an interval (the eval report's 95% intervals)."""
    groups = {str(g): {m: finite_number(v) for m, v in (values or {}).items()} for g, values in groups.items()}
    models = [m for m in colours if any(values.get(m) is not None for values in groups.values())]
    groups = {g: values for g, values in groups.items() if any(values.get(m) is not None for m in models)}
    if not groups:
        return ""
    ranges = {(str(g), m): (finite_number(lo), finite_number(hi))
              for g, per_model in (whiskers or {}).items() for m, (lo, hi) in (per_model or {}).items()}  # fmt: skip
    ranges = {k: r for k, r in ranges.items() if None not in r and k[0] in groups and groups[k[0]].get(k[1]) is not None}
    values = [v for vals in groups.values() for v in vals.values() if v is not None]
    if fmt == "percent" and 0 <= min(values) and max(values) <= 1:
        ticks = [0, 0.25, 0.5, 0.75, 1.0]  # shares always on the full scale, so charts compare at a glance
    else:
        ends = [v for r in ranges.values() for v in r]  # whiskers stay on the axis
        ticks = _ticks(min(0.0, *values, *ends), max(0.0, *values, *ends))
    width = LEFT + max(488, len(groups) * (len(models) * 14 + 28)) + RIGHT
    slot = (width - RIGHT - LEFT) / len(groups)
    bar = min(36.0, slot * 0.6 / len(models))
    legend, top = _legend([(model_label(result, m), colours[m], "bar") for m in models], width)
    top += 14  # room for the value printed above the tallest bar
    names = {group: _wrap(group, slot - 6) for group in groups}
    bottom = 20 + 13 * max(len(lines) for lines in names.values())
    height = top + 180 + bottom
    y = _scale(ticks[0], ticks[-1], height - bottom, top)
    body = legend + _y_grid(ticks, y, width - RIGHT, fmt)
    for i, (group, vals) in enumerate(groups.items()):
        x0 = LEFT + i * slot + (slot - len(models) * bar) / 2
        for j, model in enumerate(models):
            if vals.get(model) is None:
                continue
            v = vals[model]
            # A measured zero still gets a 2-unit stub, so it is not mistaken for "not measured";
            # a negative bar hangs from the zero line.
            y_top, y_bottom = (min(y(v), y(0) - 2), y(0)) if v >= 0 else (y(0), max(y(v), y(0) + 2))
            tip = escape(f"{model_label(result, model)}, {group}: {format_value(v, fmt)}")
            body.append(f'<rect x="{x0 + j * bar + 1:.1f}" y="{y_top:.1f}" width="{bar - 2:.1f}" '
                        f'height="{y_bottom - y_top:.1f}" fill="{colours[model]}"><title>{tip}</title></rect>')  # fmt: skip
            if (group, model) in ranges:
                body += _whisker(x0 + (j + 0.5) * bar, *ranges[group, model], y, ticks, min(8.0, bar / 2))
                y_top = min(y_top, y(min(max(ranges[group, model][1], ticks[0]), ticks[-1])))  # the value's label above it
            if bar >= 24:  # narrower bars keep the value in their tooltip only
                short = f"{v * 100:.0f}%" if fmt == "percent" else three_digits(v)
                body.append(f'<text x="{x0 + (j + 0.5) * bar:.1f}" y="{y_top - 4:.1f}" text-anchor="middle" '
                            f'font-size="10">{short}</text>')  # fmt: skip
        for k, line in enumerate(names[group]):
            body.append(f'<text x="{LEFT + (i + 0.5) * slot:.1f}" y="{height - bottom + 16 + k * 13}" '
                        f'text-anchor="middle">{escape(line)}</text>')  # fmt: skip
    body.append(f'<line x1="{LEFT}" x2="{width - RIGHT}" y1="{y(0):.1f}" y2="{y(0):.1f}" stroke="#6b7280"/>')
    return _svg(width, height, title, body)


def _whisker(x: float, low: float, high: float, y, ticks: list[float], cap: float) -> list[str]:
    """A vertical range with caps, clipped to the axis (a cap only where the range ends inside it)."""
    lo, hi = max(low, ticks[0]), min(high, ticks[-1])
    stroke = 'stroke="#1f2937" stroke-width="1.5"'
    out = [f'<line class="whisker" x1="{x:.1f}" x2="{x:.1f}" y1="{y(lo):.1f}" y2="{y(hi):.1f}" {stroke}/>']
    for v, inside in ((lo, lo == low), (hi, hi == high)):
        if inside:
            out.append(f'<line x1="{x - cap / 2:.1f}" x2="{x + cap / 2:.1f}" y1="{y(v):.1f}" y2="{y(v):.1f}" {stroke}/>')
    return out


def _x_axis(ticks: list[float], x, bottom: float, width: float) -> list[str]:
    out = [f'<line x1="{LEFT}" x2="{width - RIGHT}" y1="{bottom}" y2="{bottom}" stroke="#6b7280"/>',
           f'<text x="{(LEFT + width - RIGHT) / 2}" y="{bottom + 36}" text-anchor="middle">step</text>']  # fmt: skip
    for t in ticks:
        out.append(f'<line x1="{x(t):.1f}" x2="{x(t):.1f}" y1="{bottom}" y2="{bottom + 4}" stroke="#6b7280"/>')
        label = _tick_text(t, ticks[1] - ticks[0])
        out.append(f'<text x="{x(t):.1f}" y="{bottom + 17}" text-anchor="middle">{label}</text>')
    return out


def loss_chart(run: str, points: list, result: dict, colour: str) -> str:
    """Training loss against step in the run's colour, eval loss as dots on a dashed line; "" if no data."""
    series = {}
    for key in ("loss", "eval_loss"):
        pairs = [(finite_number(p.get("step")), finite_number(p.get(key))) for p in points if isinstance(p, dict)]
        series[key] = sorted((s, v) for s, v in pairs if s is not None and v is not None)
    pairs = series["loss"] + series["eval_loss"]
    if not pairs:
        return ""
    steps, losses = [s for s, _ in pairs], [v for _, v in pairs]
    width, height = 560, 280
    items = [("loss", colour, "line")] + ([("eval loss", EVAL_COLOUR, "dot")] if series["eval_loss"] else [])
    legend, top = _legend(items, width)
    xt = _ticks(min(steps), max(steps), 6, integer=all(s.is_integer() for s in steps))
    yt = _ticks(min(losses), max(losses))
    x = _scale(xt[0], xt[-1], LEFT, width - RIGHT)
    y = _scale(yt[0], yt[-1], height - BOTTOM, top + 6)
    body = legend + _y_grid(yt, y, width - RIGHT) + _x_axis(xt, x, height - BOTTOM, width)
    middle = (top + height - BOTTOM) / 2
    body.append(f'<text transform="translate(14 {middle:.0f}) rotate(-90)" text-anchor="middle">loss</text>')
    for key, paint, dash in (("loss", colour, ""), ("eval_loss", EVAL_COLOUR, ' stroke-dasharray="5 4"')):
        coords = " ".join(f"{x(s):.1f},{y(v):.1f}" for s, v in series[key])
        if coords:
            body.append(f'<polyline class="{key}" points="{coords}" fill="none" stroke="{paint}" stroke-width="2" '
                        f'stroke-linejoin="round"{dash}/>')  # fmt: skip
        # Dots mark eval points (few, irregular) and a lone training point a line cannot show.
        if key == "eval_loss" or len(series[key]) == 1:
            body += [f'<circle cx="{x(s):.1f}" cy="{y(v):.1f}" r="3.5" fill="{paint}"/>' for s, v in series[key]]
    return _svg(width, height, f"Training loss of {model_label(result, run)}", body)


def seeds_chart(title: str, groups: dict, fmt: str | None, before=None) -> str:
    """One metric across the grid points of an experiment: each run (seed) a dot, the mean of
    the point a pale bar behind them, and the before model's value a dashed line; "" if nothing
    to draw. ``groups`` is {point: [value per seed]}. Dots are spread sideways so that equal
    values stay countable."""
    groups = {str(g): [v for v in map(finite_number, values or []) if v is not None] for g, values in groups.items()}
    groups = {g: values for g, values in groups.items() if values}
    if not groups:
        return ""
    before = finite_number(before)
    values = [v for vals in groups.values() for v in vals] + ([before] if before is not None else [])
    if fmt == "percent" and 0 <= min(values) and max(values) <= 1:
        ticks = [0, 0.25, 0.5, 0.75, 1.0]
    else:
        ticks = _ticks(min(values), max(values))
    width = LEFT + max(488, len(groups) * 90) + RIGHT
    slot = (width - RIGHT - LEFT) / len(groups)
    items = [("run (seed)", PALETTE[0], "dot"), ("mean", "#c7d6e8", "bar")]
    if before is not None:
        items.append(("before", EVAL_COLOUR, "line"))
    legend, top = _legend(items, width)
    names = {group: _wrap(group, slot - 6) for group in groups}
    bottom = 20 + 13 * max(len(lines) for lines in names.values())
    height = top + 10 + 180 + bottom
    y = _scale(ticks[0], ticks[-1], height - bottom, top + 10)
    body = legend + _y_grid(ticks, y, width - RIGHT, fmt)
    base = min(max(0.0, ticks[0]), ticks[-1])  # bars stand on zero when the axis holds it
    for i, (group, vals) in enumerate(groups.items()):
        centre, mean = LEFT + (i + 0.5) * slot, sum(vals) / len(vals)
        half = min(36.0, slot * 0.3)
        y_top, y_bottom = sorted((y(mean), y(base)))
        tip = escape(f"{group}: mean {format_value(mean, fmt)} of {len(vals)}")
        body.append(f'<rect class="mean" x="{centre - half:.1f}" y="{y_top:.1f}" width="{2 * half:.1f}" '
                    f'height="{max(y_bottom - y_top, 2):.1f}" fill="#c7d6e8"><title>{tip}</title></rect>')  # fmt: skip
        body.append(f'<line x1="{centre - half:.1f}" x2="{centre + half:.1f}" y1="{y(mean):.1f}" y2="{y(mean):.1f}" '
                    f'stroke="{PALETTE[0]}" stroke-width="2"/>')  # fmt: skip
        spread = min(half * 0.8, 6.0 * (len(vals) - 1))
        for k, v in enumerate(vals):
            dx = 0.0 if len(vals) == 1 else -spread + 2 * spread * k / (len(vals) - 1)
            body.append(f'<circle class="seed" cx="{centre + dx:.1f}" cy="{y(v):.1f}" r="4" fill="{PALETTE[0]}" '
                        f'fill-opacity="0.85"><title>{escape(f"{group}, run {k + 1}: {format_value(v, fmt)}")}</title></circle>')  # fmt: skip
        for k, line in enumerate(names[group]):
            body.append(f'<text x="{centre:.1f}" y="{height - bottom + 16 + k * 13}" text-anchor="middle">{escape(line)}</text>')
    if before is not None:
        body.append(f'<line class="before" x1="{LEFT}" x2="{width - RIGHT}" y1="{y(before):.1f}" y2="{y(before):.1f}" '
                    f'stroke="{EVAL_COLOUR}" stroke-width="1.5" stroke-dasharray="5 4"/>')  # fmt: skip
    return _svg(width, height, title, body)
