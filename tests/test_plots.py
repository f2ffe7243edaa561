"""liandan.plots on its own: the value helpers with literal expectations, colours, and the SVG
charts read back as XML. tests/test_eval_report.py checks the charts inside a whole report page."""

from __future__ import annotations

import math
import xml.etree.ElementTree as ET

import pytest

from liandan.plots import DASH, MINUS, bar_chart, finite_number, format_value, loss_chart, model_colours, model_label, three_digits

NASTY = 'a<b> & "c" \'d\''  # every character html.escape rewrites


def parse(svg: str) -> ET.Element:
    root = ET.fromstring(svg)  # raises on anything that is not well-formed XML
    assert root.tag == "svg" and root.get("viewBox") and "nan" not in svg.lower() and "inf" not in svg.lower()
    return root


def bars(root: ET.Element) -> list[ET.Element]:
    """The data bars: legend swatches are rects too, but only bars carry a tooltip."""
    return [r for r in root.iter("rect") if r.find("title") is not None]


def grid(root: ET.Element) -> dict[str, float]:
    """Tick label -> y of its grid line, as the reader sees the axis."""
    lines = [float(line.get("y1")) for line in root.iter("line") if line.get("stroke") == "#e5e7eb"]
    labels = [t.text for t in root.iter("text") if t.get("text-anchor") == "end"]
    assert len(lines) == len(labels) >= 2
    return dict(zip(labels, lines))


def points(root: ET.Element, key: str) -> list[tuple[float, float]]:
    line = [p for p in root.iter("polyline") if p.get("class") == key]
    if not line:
        return []
    return [tuple(map(float, p.split(","))) for p in line[0].get("points").split()]


# ---------------------------------------------------------------------------------------------
# Values


def test_finite_number_keeps_only_real_finite_numbers():
    assert finite_number(True) is None and finite_number(False) is None  # a bool is not a measurement
    for nothing in (None, float("nan"), float("inf"), -math.inf, "1.5", [1.0], {}):
        assert finite_number(nothing) is None, nothing
    assert finite_number(3) == 3.0 and type(finite_number(3)) is float
    assert finite_number(-2.5) == -2.5 and finite_number(0) == 0.0


@pytest.mark.parametrize(
    ("value", "text"),
    [(2.314, "2.31"), (23.14, "23.1"), (0.04213, "0.0421"), (1234.5, "1234"), (0.5, "0.500"), (100, "100"),
     (-2.314, "-2.31"), (0, "0"), (0.0, "0"), (1e-4, "0.000100"), (9.876e-05, "9.88e-05"), (-1.2345e-05, "-1.23e-05"),
     (1e6, "1000000"), (9.999, "10.0"), (0.99996, "1.00"), (-99.96, "-100")],
)  # fmt: skip
def test_three_digits(value, text):
    assert three_digits(value) == text


def test_format_value_by_format():
    assert (DASH, MINUS) == ("\u2014", "\u2212")
    assert format_value(0.953, "percent") == "95.3%" and format_value(0, "percent") == "0.0%"
    assert format_value(1.2, "percent") == "120.0%"
    assert format_value(0.953, "number") == "0.953" and format_value(2.314, None) == "2.31"
    for nothing in (None, float("nan"), float("inf"), True, "0.5"):
        assert format_value(nothing, "percent") == DASH and format_value(nothing, "number") == DASH


def test_model_label_falls_back_to_the_model():
    result = {"labels": {"runs/a": "after", "runs/b": ""}}
    assert model_label(result, "runs/a") == "after"
    assert model_label(result, "runs/b") == "runs/b"  # an empty label would leave a legend entry blank
    assert model_label(result, "runs/c") == "runs/c"
    assert model_label({"labels": None}, "m") == "m" and model_label({}, "m") == "m"


# ---------------------------------------------------------------------------------------------
# Colours


def test_model_colours_in_order_of_first_appearance_across_models_curves_and_bars():
    result = {
        "models": ["base", "tuned"],
        "curves": {"tuned": [], "curve-only": []},
        "bars": [{"groups": {"g": {"base": 0.1, "bar-only": 0.2}, "h": None}}, {"groups": None}, {}],
    }
    assert model_colours(result) == {"base": "#4e79a7", "tuned": "#f28e2b", "curve-only": "#59a14f", "bar-only": "#e15759"}
    assert model_colours(result) == model_colours(result)  # no hidden state between calls
    assert model_colours({}) == {} and model_colours({"models": None, "curves": None, "bars": None}) == {}


def test_model_colours_stay_unique_past_the_palette():
    result = {"models": [f"m{i}" for i in range(30)]}
    colours = model_colours(result)
    assert list(colours) == result["models"]
    assert len(set(colours.values())) == 30
    assert colours["m7"] == "#9c755f"  # the last of the eight palette colours
    assert colours["m8"] == "hsl(20,55%,45%)" and colours["m9"] == "hsl(158,55%,45%)"  # golden-angle hues after it


def test_a_model_keeps_its_colour_when_others_are_added_after_it():
    few = model_colours({"models": ["a", "b"]})
    more = model_colours({"models": ["a", "b"], "curves": {"c": []}, "bars": [{"groups": {"g": {"d": 1}}}]})
    assert {m: more[m] for m in few} == few


# ---------------------------------------------------------------------------------------------
# Bar charts


def test_one_bar_per_group_and_model_with_a_value():
    result = {"models": ["a", "b"], "labels": {"a": "before"}}
    colours = model_colours(result)
    svg = bar_chart("Retention", {"facts": {"a": 0.5, "b": 0.25}, "maths": {"a": 1.0, "b": None}}, "percent", result, colours)
    root = parse(svg)
    assert root.get("aria-label") == "Retention"
    drawn = bars(root)
    assert [r.find("title").text for r in drawn] == ["before, facts: 50.0%", "b, facts: 25.0%", "before, maths: 100.0%"]
    assert [r.get("fill") for r in drawn] == [colours["a"], colours["b"], colours["a"]]
    legend = [t.text for t in root.iter("text")][:2]
    assert legend == ["before", "b"]
    axis = grid(root)
    assert list(axis) == ["0%", "25%", "50%", "75%", "100%"]  # shares are always drawn on the full scale
    for rect, value in zip(drawn, (0.5, 0.25, 1.0)):
        top, bottom = float(rect.get("y")), float(rect.get("y")) + float(rect.get("height"))
        assert bottom == pytest.approx(axis["0%"])
        assert top == pytest.approx(axis["0%"] + value * (axis["100%"] - axis["0%"]))
    labels = [t.text for t in root.iter("text") if t.get("font-size") == "10"]
    assert labels == ["50%", "25%", "100%"]  # the value above each (wide enough) bar


def test_bars_follow_the_axis_for_numbers_below_and_above_zero():
    result = {"models": ["m"]}
    root = parse(bar_chart("Loss", {"down": {"m": -2.0}, "up": {"m": 3.0}, "zero": {"m": 0}}, "number", result, model_colours(result)))
    axis = grid(root)
    assert list(axis) == [f"{MINUS}2", f"{MINUS}1", "0", "1", "2", "3"]
    down, up, zero = bars(root)
    assert float(up.get("y")) == pytest.approx(axis["3"])
    assert float(up.get("y")) + float(up.get("height")) == pytest.approx(axis["0"])
    assert float(down.get("y")) + float(down.get("height")) == pytest.approx(axis[f"{MINUS}2"])
    assert float(down.get("y")) == pytest.approx(axis["0"])  # a negative bar hangs from the zero line
    assert float(zero.get("height")) == 2.0  # a measured zero is a stub, not "not measured"
    assert zero.find("title").text == "m, zero: 0"


def whiskers(root: ET.Element) -> list[tuple[float, float, float]]:
    """(x, top y, bottom y) of each whisker's vertical line."""
    lines = [w for w in root.iter("line") if w.get("class") == "whisker"]
    return [(float(w.get("x1")), min(float(w.get("y1")), float(w.get("y2"))), max(float(w.get("y1")), float(w.get("y2"))))
            for w in lines]  # fmt: skip


def test_whiskers_span_their_range_on_the_axis_and_centre_on_their_bar():
    result = {"models": ["a", "b"]}
    groups = {"task": {"a": 0.2, "b": 0.6}, "probes": {"a": 0.9, "b": 0.8}}
    ranges = {"task": {"b": (0.45, 0.75)}, "probes": {"b": (0.7, 1.1)}}  # past 100%: clipped to the axis, no cap there
    root = parse(bar_chart("Metrics", groups, "percent", result, model_colours(result), ranges))
    axis = grid(root)
    assert list(axis) == ["0%", "25%", "50%", "75%", "100%"]

    def y(v):
        return axis["0%"] + v * (axis["100%"] - axis["0%"])

    drawn = bars(root)
    (x1, top1, bottom1), (x2, top2, bottom2) = whiskers(root)
    centre = [float(r.get("x")) + float(r.get("width")) / 2 for r in drawn]
    assert (x1, x2) == pytest.approx((centre[1], centre[3]), abs=0.15)  # on the "b" bars
    assert (top1, bottom1) == pytest.approx((y(0.75), y(0.45)), abs=0.15)
    assert (top2, bottom2) == pytest.approx((y(1.0), y(0.7)), abs=0.15)
    caps = [w for w in root.iter("line") if w.get("class") is None and w.get("stroke") == "#1f2937"]
    assert len(caps) == 3  # both ends of the first, only the lower end of the clipped one
    assert not whiskers(parse(bar_chart("Metrics", groups, "percent", result, model_colours(result))))
    # a range on a model or group with no bar, or with a missing end, draws nothing
    ranges = {"task": {"c": (0.1, 0.2), "b": (None, 0.3)}, "nowhere": {"a": (0.1, 0.2)}}
    assert not whiskers(parse(bar_chart("Metrics", groups, "percent", result, model_colours(result), ranges)))


def test_whiskers_widen_a_number_axis():
    result = {"models": ["a"]}
    root = parse(bar_chart("Perplexity", {"drift": {"a": 2.0}}, "number", result, model_colours(result), {"drift": {"a": (1.5, 3.4)}}))
    assert max(float(k) for k in grid(root)) >= 3.4


def test_bar_chart_escapes_every_label():
    result = {"models": [NASTY], "labels": {NASTY: NASTY + " label"}}
    svg = bar_chart(NASTY + " title", {NASTY + " group": {NASTY: 0.5}}, "percent", result, model_colours(result))
    assert "<b>" not in svg and '"c"' not in svg
    root = parse(svg)
    assert root.get("aria-label") == NASTY + " title"
    texts = [t.text for t in root.iter("text")]
    assert NASTY + " label" in texts
    assert bars(root)[0].find("title").text == f"{NASTY} label, {NASTY} group: 50.0%"
    group_lines = [t.text for t in root.iter("text") if t.get("text-anchor") == "middle" and t.get("font-size") is None]
    assert " ".join(group_lines) == NASTY + " group"  # the group name, wrapped under its bars


def test_bar_chart_draws_only_models_with_a_colour_and_groups_with_a_value():
    colours = {"a": "#111111"}
    root = parse(bar_chart("T", {"g": {"a": 0.2, "ghost": 0.9}, "empty": {"a": None}, "nan": {"a": float("nan")}}, None, {}, colours))
    assert [r.find("title").text for r in bars(root)] == ["a, g: 0.200"]
    assert "empty" not in ET.tostring(root, encoding="unicode") and "ghost" not in ET.tostring(root, encoding="unicode")


@pytest.mark.parametrize(
    "groups",
    [{}, {"g": {}}, {"g": None}, {"g": {"a": None}}, {"g": {"a": float("nan"), "b": float("inf")}}, {"g": {"a": True}}],
)
def test_bar_chart_with_nothing_to_draw_is_empty(groups):
    assert bar_chart("T", groups, "percent", {"models": ["a", "b"]}, model_colours({"models": ["a", "b"]})) == ""


@pytest.mark.parametrize("values", [[5.0, 5.0], [0.0, 0.0], [-1.0, -1.0], [1e-9, 1e-9], [7.0]])
def test_bar_chart_survives_equal_or_single_values(values):
    result = {"models": ["a"]}
    groups = {f"g{i}": {"a": v} for i, v in enumerate(values)}
    root = parse(bar_chart("T", groups, "number", result, model_colours(result)))
    drawn = bars(root)
    assert len(drawn) == len(values) and all(float(r.get("height")) > 0 for r in drawn)


def test_many_models_get_narrow_bars_without_value_labels():
    result = {"models": [f"m{i}" for i in range(12)]}
    groups = {g: {m: 0.5 for m in result["models"]} for g in ("g", "h")}
    root = parse(bar_chart("T", groups, "percent", result, model_colours(result)))
    drawn = bars(root)
    assert len(drawn) == 24 and len({r.get("fill") for r in drawn}) == 12
    assert [t for t in root.iter("text") if t.get("font-size") == "10"] == []  # values stay in the tooltips


def test_a_long_group_name_wraps_to_at_most_three_lines():
    result = {"models": ["a"]}
    name = " ".join(["word"] * 200)
    root = parse(bar_chart("T", {name: {"a": 1.0}, "short": {"a": 2.0}}, None, result, model_colours(result)))
    lines = [t.text for t in root.iter("text") if t.get("text-anchor") == "middle" and t.get("font-size") is None]
    assert len(lines) == 4 and lines[-1] == "short"
    assert lines[2].endswith("…")


# ---------------------------------------------------------------------------------------------
# Loss charts


def test_one_point_per_logged_step_in_step_order():
    curve = [{"step": 3, "loss": 1.0}, {"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.5, "eval_loss": 1.8},
             {"step": 4, "loss": None}, {"step": None, "loss": 0.1}, "garbage", {"step": True, "loss": 0.2}]  # fmt: skip
    root = parse(loss_chart("run", curve, {"labels": {"run": "after"}}, "#123456"))
    assert root.get("aria-label") == "Training loss of after"
    train = points(root, "loss")
    assert len(train) == 3
    xs, ys = [x for x, _ in train], [y for _, y in train]
    assert xs == sorted(xs) and xs[1] - xs[0] == pytest.approx(xs[2] - xs[1])  # steps 1, 2, 3 evenly spaced
    assert ys[0] < ys[1] < ys[2]  # loss falls, so the line goes down the page (y grows downwards)
    assert ys[0] - ys[1] == pytest.approx(ys[1] - ys[2])  # 2.0, 1.5, 1.0: linear in the loss
    axis = grid(root)
    assert ys[0] == pytest.approx(axis["2.0"]) and ys[2] == pytest.approx(axis["1.0"])
    assert points(root, "eval_loss") == [(xs[1], pytest.approx(axis["1.8"]))]
    line = next(p for p in root.iter("polyline") if p.get("class") == "loss")
    assert line.get("stroke") == "#123456"
    dots = [(float(c.get("cx")), float(c.get("cy"))) for c in root.iter("circle") if c.get("r") == "3.5"]
    assert dots == points(root, "eval_loss")  # the lone eval point is marked, the training line is not


def test_eval_points_are_dots_and_training_points_are_a_line():
    curve = [{"step": s, "loss": 3.0 - s * 0.1} for s in range(1, 6)] + [{"step": 5, "eval_loss": 2.6}]
    root = parse(loss_chart("run", curve, {}, "#123456"))
    dots = [c for c in root.iter("circle") if c.get("r") == "3.5"]
    assert len(dots) == 1 and dots[0].get("fill") != "#123456"  # the eval point, in its own colour
    assert [t.text for t in root.iter("text")][:2] == ["loss", "eval loss"]
    without_eval = parse(loss_chart("run", curve[:-1], {}, "#123456"))
    assert "eval loss" not in [t.text for t in without_eval.iter("text")]
    assert [c for c in without_eval.iter("circle")] == []


def test_loss_chart_escapes_the_run_label():
    root = parse(loss_chart(NASTY, [{"step": 1, "loss": 1.0}, {"step": 2, "loss": 0.5}], {}, "#000000"))
    assert root.get("aria-label") == f"Training loss of {NASTY}"


@pytest.mark.parametrize(
    "curve",
    [[], [{"step": 1}], [{"step": 1, "loss": float("nan")}], [{"loss": 1.0}], ["x", None, 3],
     [{"step": float("inf"), "loss": 1.0}]],
)
def test_loss_chart_with_nothing_to_draw_is_empty(curve):
    assert loss_chart("run", curve, {}, "#000000") == ""


@pytest.mark.parametrize(
    "curve",
    [[{"step": 7, "loss": 0.7}], [{"step": s, "loss": 0.0} for s in range(5)], [{"step": 1, "loss": 2.0}] * 3,
     [{"step": 0.5, "loss": 1.0}, {"step": 1.5, "loss": 1e-7}], [{"step": 1, "eval_loss": 1.0}]],
)  # fmt: skip
def test_loss_chart_survives_single_and_flat_curves(curve):
    root = parse(loss_chart("run", curve, {}, "#000000"))
    logged = [p for p in curve if "loss" in p]
    assert len(points(root, "loss")) == len(logged)
    for x, y in points(root, "loss") + points(root, "eval_loss"):
        assert 0 <= x <= float(root.get("width")) and 0 <= y <= float(root.get("height"))
