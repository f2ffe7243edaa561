"""The tables and the chart of `scaling.py`, from its results.

    from scaling_report import write_outputs
    write_outputs(results, Path("bench-scaling"))   # results.json, scaling.md, scaling.svg

Cells measured in separate runs (one size per run, say: the grid takes hours) are put into one
report with

    python benchmarks/scaling_report.py runs/scaling-135m runs/scaling-1.7b --out runs/scaling

which refuses runs whose settings (steps, warm-up, repeats, tokens per step, LoRA, checkpointing
rule) or machine differ, or that measured the same cell twice. Each size keeps the matmul peak
measured in its run (the first run, if several measured that size), which is what its cells'
shares of the peak are computed against.

The chart is drawn with liandan's own SVG bar charts (`liandan.plots.bar_chart`, the eval
report's), one pair per mode and sequence length: tokens/s and peak RSS per model size, liandan
beside TRL, in one standalone SVG file.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from html import escape
from pathlib import Path

from scaling_profile import BUCKETS

NAMES = {"liandan": "liandan", "trl": "TRL best"}
LABELS = {"135m": "135M", "360m": "360M", "1.7b": "1.7B", "tiny": "tiny"}


def write_outputs(results: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    tables = markdown(results)
    print("\n" + tables)
    for name, text in (("results.json", json.dumps(results, indent=1) + "\n"), ("scaling.md", tables),
                       ("scaling.svg", chart(results))):  # fmt: skip
        temporary = out / f".{name}.tmp"
        temporary.write_text(text, encoding="utf-8")
        os.replace(temporary, out / name)
    print(f"wrote {out / 'results.json'}, {out / 'scaling.md'}, {out / 'scaling.svg'}")


COMPARABLE = ("steps", "warmup", "repeats", "step_tokens", "lr", "lora_rank", "lora_alpha", "checkpointing")
"""Settings that must be the same in runs put into one report (max_seconds and profile need not)."""
DEFAULTS = {"checkpointing": "auto"}
"""What a run that predates a setting ran with."""
SIZE_ORDER = ("tiny", "135m", "360m", "1.7b")
"""The order of a merged report's cells: by size, then LoRA before full, then sequence length."""


def merge(runs: list[tuple[str, dict]]) -> dict:
    """One results dict from several runs' (name, results); raises ValueError naming the run and
    the setting, machine property or cell that keeps them apart."""
    (first_name, first), *rest = runs
    merged = {"machine": first["machine"], "settings": {**DEFAULTS, **first["settings"]}, "sizes": dict(first["sizes"]),
              "cells": list(first["cells"])}  # fmt: skip
    seen = {(c["size"], c["mode"], c["seq"], c["trainer"]) for c in first["cells"]}
    for name, results in rest:
        for key in COMPARABLE:
            theirs, ours = (r["settings"].get(key, DEFAULTS.get(key)) for r in (results, first))
            if theirs != ours:
                raise ValueError(f"{name}: setting '{key}' is {theirs!r}, but {ours!r} in {first_name}")
        for key in ("cpus", "torch_threads", "bf16"):
            if results["machine"][key] != first["machine"][key]:
                raise ValueError(f"{name}: machine '{key}' is {results['machine'][key]!r}, "
                                 f"but {first['machine'][key]!r} in {first_name}")  # fmt: skip
        for cell in results["cells"]:
            key = (cell["size"], cell["mode"], cell["seq"], cell["trainer"])
            if key in seen:
                raise ValueError(f"{name}: {cell['trainer']} at {cell['size']} {cell['mode']} seq {cell['seq']} "
                                 "was measured in an earlier run too")  # fmt: skip
            seen.add(key)
            merged["cells"].append(cell)
        for size, info in results["sizes"].items():
            merged["sizes"].setdefault(size, info)
        merged["settings"]["profile"] = merged["settings"].get("profile") or results["settings"].get("profile")
    merged["cells"].sort(key=lambda c: (SIZE_ORDER.index(c["size"]) if c["size"] in SIZE_ORDER else len(SIZE_ORDER),
                                        c["mode"] != "lora", c["seq"]))  # fmt: skip
    return merged


def main() -> None:
    parser = argparse.ArgumentParser(description="Put the results of several scaling.py runs into one report.")
    parser.add_argument("runs", nargs="+", help="directories holding a scaling.py results.json")
    parser.add_argument("--out", required=True, help="directory for the merged results.json, scaling.md, scaling.svg")
    args = parser.parse_args()
    runs = []
    for run in args.runs:
        path = Path(run) / "results.json"
        if not path.is_file():
            sys.exit(f"{path}: no such file (give directories that scaling.py wrote)")
        runs.append((str(path), json.loads(path.read_text(encoding="utf-8"))))
    try:
        results = merge(runs)
    except ValueError as problem:
        sys.exit(str(problem))
    write_outputs(results, Path(args.out))


def pairs(results: dict) -> dict[tuple, dict[str, dict]]:
    """{(size, mode, seq): {trainer: cell}} in the order the cells ran."""
    grouped: dict[tuple, dict[str, dict]] = {}
    for cell in results["cells"]:
        grouped.setdefault((cell["size"], cell["mode"], cell["seq"]), {})[cell["trainer"]] = cell
    return grouped


def ok(cell: dict | None) -> bool:
    return cell is not None and cell["status"] == "ok"


def ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}x"


def gflops(cell: dict, results: dict) -> str:
    achieved = cell["tokens_per_second"] * cell["flops_per_token"] / 1e9
    peak = results["sizes"].get(cell["size"], {}).get("matmul_peak_gflops")
    return f"{achieved:.0f} ({100 * achieved / peak:.0f}%)" if peak else f"{achieved:.0f}"


def speed(cell: dict | None) -> str:
    """Tokens/s, or why there are none (one line, no table bars)."""
    if cell is None:
        return "—"
    if not ok(cell):
        return cell["status"].strip().splitlines()[-1][:200].replace("|", "/")
    return f"{cell['tokens_per_second']:.1f}" + (" (ckpt)" if cell.get("checkpointing") else "")


def markdown(results: dict) -> str:
    m = results["machine"]
    s = results["settings"]
    lines = [
        (f"{m['cpus']} CPUs ({m['torch_threads']} torch threads), {m['memory_gib']:.0f} GiB, "
         f"{'bf16' if m['bf16'] else 'fp32 (no native bf16)'}; median of {s['steps']} steps after {s['warmup']} "
         f"warm-up step(s), median of {s.get('repeats', 1)} run(s); a step is max(1, {s['step_tokens']} // seq) rows "
         "of seq tokens."),
        "",
        ("| size | mode | seq | rows | liandan tokens/s | TRL best tokens/s | liandan / TRL | liandan peak RSS | "
         "TRL peak RSS | memory liandan / TRL | liandan GFLOP/s (% of peak) | TRL GFLOP/s (% of peak) |"),
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]  # fmt: skip
    for (size, mode, seq), cells in pairs(results).items():
        mine, theirs = cells.get("liandan"), cells.get("trl")
        row = [LABELS.get(size, size), "LoRA" if mode == "lora" else "full", str(seq), str((mine or theirs)["rows"])]
        for cell in (mine, theirs):
            row.append(speed(cell))
        row.append(ratio(mine["tokens_per_second"], theirs["tokens_per_second"]) if ok(mine) and ok(theirs) else "—")
        for cell in (mine, theirs):
            row.append(f"{cell['peak_rss_gib']:.2f} GiB" if ok(cell) else "—")
        row.append(ratio(mine["peak_rss_gib"], theirs["peak_rss_gib"]) if ok(mine) and ok(theirs) else "—")
        for cell in (mine, theirs):
            row.append(gflops(cell, results) if ok(cell) else "—")
        lines.append("| " + " | ".join(row) + " |")
    if any(c.get("checkpointing") for c in results["cells"]):
        why = ("in every run (--checkpointing always)" if s.get("checkpointing") == "always"
               else "the trainer's best configuration that fits in the memory available")  # fmt: skip
        lines += ["", f"(ckpt): with activation checkpointing, {why}."]
    lines += ["", "Matmul peak on this machine at each model's layer shapes (2,048 rows):", ""]
    lines += [f"- {LABELS.get(size, size)}: {info['matmul_peak_gflops']:.0f} GFLOP/s ({info['dtype']}), "
              f"{info['params'] / 1e6:.1f}M parameters" for size, info in results["sizes"].items()]  # fmt: skip
    profiled = [c for c in results["cells"] if ok(c) and "profile" in c]
    if profiled:
        lines += ["", "Where liandan's step goes (shares of the profiled step's self CPU time, `scaling_profile.py`):", "",
                  "| size | mode | seq | " + " | ".join(BUCKETS) + " | profiled step |",
                  "|---|---|---|" + "---|" * (len(BUCKETS) + 1)]  # fmt: skip
        for c in profiled:
            shares = " | ".join(f"{100 * c['profile']['shares'][b]:.1f}%" for b in BUCKETS)
            mode = "LoRA" if c["mode"] == "lora" else "full"
            lines.append(
                f"| {LABELS.get(c['size'], c['size'])} | {mode} | {c['seq']} | {shares} | {c['profile']['seconds']:.2f} s |"
            )
    return "\n".join(lines) + "\n"


def chart(results: dict) -> str:
    """One standalone SVG: per mode and sequence length, tokens/s and peak RSS by size."""
    from liandan.plots import PALETTE, bar_chart

    colours = {"liandan": PALETTE[0], "trl": PALETTE[1]}
    labels = {"labels": NAMES}
    panels: dict[tuple, dict[str, dict]] = {}
    for (size, mode, seq), cells in pairs(results).items():
        panel = panels.setdefault((mode, seq), {"speed": {}, "memory": {}})
        for trainer, cell in cells.items():
            if ok(cell):
                panel["speed"].setdefault(LABELS.get(size, size), {})[trainer] = cell["tokens_per_second"]
                panel["memory"].setdefault(LABELS.get(size, size), {})[trainer] = cell["peak_rss_gib"]
    body, y, width = [], 0.0, 0.0
    for (mode, seq), panel in panels.items():
        body.append(f'<text x="8" y="{y + 18:.0f}" font-size="14" font-weight="bold">'
                    f'{"LoRA" if mode == "lora" else "full fine-tuning"}, sequences of {seq} tokens</text>')  # fmt: skip
        y += 28
        x, tallest = 0.0, 0.0
        for title, key in ((f"tokens/s, seq {seq}", "speed"), (f"peak RSS (GiB), seq {seq}", "memory")):
            svg = bar_chart(title, panel[key], None, labels, colours)
            if not svg:
                body.append(f'<text x="{x + 8:.0f}" y="{y + 20:.0f}">{escape(title)}: no cell ran</text>')
                w, h = 300.0, 40.0
            else:
                w, h = (float(v) for v in re.search(r'width="([\d.]+)" height="([\d.]+)"', svg).groups())
                body.append(f'<text x="{x + 56:.0f}" y="{y + 12:.0f}" font-size="12">{escape(title)}</text>')
                body.append(f'<g transform="translate({x:.0f},{y + 16:.0f})">{svg}</g>')
                h += 16
            x, tallest = x + w + 24, max(tallest, h)
        y, width = y + tallest + 12, max(width, x)
    return (f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {width:.0f} {y:.0f}" width="{width:.0f}" '
            f'height="{y:.0f}" font-family="sans-serif"><rect width="100%" height="100%" fill="white"/>'
            + "".join(body) + "</svg>\n")  # fmt: skip


if __name__ == "__main__":
    main()
