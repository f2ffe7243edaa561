"""The numbers and texts an evaluation report shows, whatever its format (HTML, Markdown, the
terminal): a metric's change against the first model, its confidence interval, pass rates per
check, tool calls as a person reads them, and how an output ended.

    from liandan.eval_values import format_delta, format_call
    format_delta(0.0, 0.95, "percent", "higher")   # ("+95.0", "better"): percentage points
    format_call({"function": {"name": "f", "arguments": "{}"}})   # 'f({})'
"""

from __future__ import annotations

import json

from .plots import DASH, MINUS, finite_number, three_digits


def format_delta(before, after, fmt: str | None, better: str | None) -> tuple[str, str] | None:
    """``("+95.0", "better")``: the change (percentage points for percents) and its CSS class."""
    b, a = finite_number(before), finite_number(after)
    if b is None or a is None:
        return None
    d = (a - b) * 100 if fmt == "percent" else a - b
    text = f"{abs(d):.1f}" if fmt == "percent" else three_digits(abs(d))
    if float(text) == 0:  # judged on what is shown: a "+0.0" must not be painted green
        return "±" + text, "same"
    kind = "same" if better not in ("higher", "lower") else "better" if (d > 0) == (better == "higher") else "worse"
    return ("+" if d > 0 else MINUS) + text, kind


def signed_text(v: float, fmt: str | None) -> str:
    text = f"{abs(v) * 100:.1f}" if fmt == "percent" else three_digits(abs(v))
    return ("±" if float(text) == 0 else "+" if v > 0 else MINUS) + text


def format_interval(interval: dict | None, fmt: str | None) -> str | None:
    """``"[−4.1, +10.0]"``: a difference's 95% interval, in the units of `format_delta`."""
    if not isinstance(interval, dict):
        return None
    low, high = finite_number(interval.get("low")), finite_number(interval.get("high"))
    if low is None or high is None:
        return None
    return f"[{signed_text(low, fmt)}, {signed_text(high, fmt)}]"


def format_change(metric: dict, model: str, models: list[str]) -> tuple[str, str] | None:
    """A model's change against the first, with its 95% interval when the metric has one:
    ``("+95.0 [+80.1, +99.0]", "better")``, or ``("+2.9 [−4.1, +10.0], noise", "noise")`` when
    the data cannot tell the change from chance (`liandan.uncertainty`)."""
    values, fmt = metric.get("values") or {}, metric.get("format")
    delta = format_delta(values.get(models[0]), values.get(model), fmt, metric.get("better"))
    if delta is None:
        return None
    interval = (metric.get("intervals") or {}).get(model)
    bounds = format_interval(interval, fmt)
    if bounds is None:
        return delta
    if interval.get("significant"):
        return f"{delta[0]} {bounds}", delta[1]
    return f"{delta[0]} {bounds}, noise", "noise"


def set_check_names(set_: dict) -> list[str]:
    names = list(set_.get("metric_names") or [])
    for example in set_.get("examples") or []:
        for output in (example.get("outputs") or {}).values():
            names += [n for n in (output or {}).get("checks") or {} if n not in names]
    return names


SPLIT_ROWS = {"tool_call": [("tool_call, where a call is needed", True), ("tool_call, where none is needed", False)]}
"""Extra pass-rate rows of a check, over the outputs whose ``expects_call`` is the value given."""


def pass_rates(set_: dict, models: list[str]) -> list[tuple[str, dict[str, tuple[int, int]]]]:
    """Rows ``(name, {model: (passed, counted)})`` for "passed" and each check (the ``tool_call``
    check also split by whether a call is needed); null checks are not counted."""
    rows = []
    for name in ["passed", *set_check_names(set_)]:
        for label, expects in [(name, None), *SPLIT_ROWS.get(name, [])]:
            row = {}
            for model in models:
                outcomes = []
                for example in set_.get("examples") or []:
                    output = (example.get("outputs") or {}).get(model) or {}
                    value = output.get("passed") if name == "passed" else (output.get("checks") or {}).get(name)
                    if isinstance(value, bool) and (expects is None or output.get("expects_call") is expects):
                        outcomes.append(value)
                row[model] = (sum(outcomes), len(outcomes))
            rows.append((label, row))
    return rows


def format_call(call: dict) -> str:
    """``get_weather({"city": "Oslo"})``: a call in the OpenAI shape, as a person reads it."""
    function = call.get("function") if isinstance(call, dict) else None
    if not isinstance(function, dict):
        return json.dumps(call, ensure_ascii=False)
    arguments = function.get("arguments")
    text = arguments if isinstance(arguments, str) else json.dumps(arguments if arguments is not None else {}, ensure_ascii=False)
    return f"{function.get('name')}({text})"


def calls_text(calls) -> str:
    """Each call on its own line, or "no call"."""
    return "\n".join(format_call(c) for c in calls) if calls else "no call"


def pass_rate_text(passed: int, counted: int) -> str:
    return DASH if counted == 0 else f"{passed / counted * 100:.1f}% ({passed}/{counted})"


def status_line(output: dict) -> str:
    parts = []
    if finite_number(output.get("new_tokens")) is not None:
        n = int(output["new_tokens"])
        parts.append("1 token" if n == 1 else f"{n} tokens")
    if isinstance(output.get("stopped"), bool):
        parts.append("stopped" if output["stopped"] else "hit the length limit")
    return " · ".join(parts)
