"""benchmarks/scaling.py end to end on its tiny shape (one run of the script, both trainers when
TRL is installed), how its profile buckets a step's ops, and what it does with a run that would
not fit in memory.

TRL is in the ``bench`` extra, not in the test extras: without it, the TRL half is skipped."""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import xml.dom.minidom
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "scaling.py"
HAVE_TRL = importlib.util.find_spec("trl") is not None
sys.path.insert(0, str(ROOT / "benchmarks"))

from scaling import SHAPES  # benchmarks/ is not a package: found through sys.path


def run_script(out: Path, *options: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # tiny shapes: one thread is as fast, and leaves the other core free
    return subprocess.run([sys.executable, str(SCRIPT), "--sizes", "tiny", "--seqs", "64", "--modes", "lora", "--steps", "2",
                           "--step-tokens", "128", "--out", str(out), *options],
                          check=False, capture_output=True, text=True, env=env, timeout=900)  # fmt: skip


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> tuple[dict, Path]:
    out = tmp_path_factory.mktemp("scaling")
    proc = run_script(out, "--trainers", "liandan,trl" if HAVE_TRL else "liandan", "--profile")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads((out / "results.json").read_text()), out


def cell(results: dict, trainer: str) -> dict:
    (found,) = [c for c in results["cells"] if c["trainer"] == trainer]
    return found


def test_liandan_cell_measured_and_written(tiny_run):
    results, out = tiny_run
    mine = cell(results, "liandan")
    assert mine["status"] == "ok" and mine["rows"] == 2 and mine["seq"] == 64
    assert len(mine["step_seconds"]) == 3  # the warm-up step and two measured; the profiled one is not timed
    assert mine["tokens_per_second"] > 0 and 0.1 < mine["peak_rss_gib"] < 8
    assert all(0 < loss < 10 for loss in mine["losses"]) and len(mine["losses"]) == 4
    assert mine["trained_tokens"] == [2 * 63] * 4  # two full rows of 64 a step, every target trained
    shares = mine["profile"]["shares"]
    assert abs(sum(shares.values()) - 1) < 1e-6
    assert all(shares[b] > 0 for b in ("matmuls", "attention", "element-wise", "head and loss", "optimizer"))
    size = results["sizes"]["tiny"]
    assert size["params"] == SHAPES["tiny"].params()  # the FLOP and memory estimates count the model that was built
    assert size["matmul_peak_gflops"] > 0
    table = (out / "scaling.md").read_text()
    assert "| tiny | LoRA | 64 | 2 |" in table and "head and loss" in table
    svg = xml.dom.minidom.parse(str(out / "scaling.svg")).documentElement
    assert svg.tagName == "svg" and svg.getAttribute("xmlns") == "http://www.w3.org/2000/svg"
    assert "tokens/s, seq 64" in (out / "scaling.svg").read_text()


@pytest.mark.skipif(not HAVE_TRL, reason='TRL is not installed (pip install -e ".[bench]")')
def test_trl_cell_on_the_same_blocks(tiny_run):
    results, out = tiny_run
    theirs = cell(results, "trl")
    assert theirs["status"] == "ok" and "profile" not in theirs
    assert len(theirs["step_seconds"]) == 3 and theirs["tokens_per_second"] > 0 and theirs["peak_rss_gib"] > 0.1
    assert theirs["tokens"] == [2 * 64] * 3  # two full rows a step, as liandan's: no padding, nothing cut
    assert all(0 < loss < 10 for loss in theirs["losses"])
    row = next(line for line in (out / "scaling.md").read_text().splitlines() if line.startswith("| tiny | LoRA | 64"))
    assert row.count("x |") >= 2  # the tokens/s and memory ratios, measured in the same run


def grid_options(**options) -> argparse.Namespace:
    """The options `scaling.run_grid` reads, as the command line would give them."""
    defaults = {"steps": 3, "warmup": 1, "repeats": 1, "step_tokens": 2048, "max_seconds": 60, "memory_gib": None,
                "checkpointing": "auto"}  # fmt: skip
    return argparse.Namespace(**{**defaults, "profile": False, **options})


def test_cell_too_large_is_skipped_with_its_reason(capsys):
    from scaling import run_grid

    plan = {"sizes": ["tiny"], "seqs": [64], "modes": ["lora"], "trainers": ["liandan"]}
    results = run_grid(grid_options(memory_gib=0.5), plan)
    (only,) = results["cells"]
    assert only["status"] == f"skipped: needs ~{only['estimate_gib']:.0f} GiB, machine has 0.5"
    assert only["estimate_gib"] > 0.5
    assert "building" not in capsys.readouterr().out  # nothing to run: the model is not even built
    assert results["sizes"] == {}


def test_activations_are_checkpointed_only_where_a_run_would_not_fit_without():
    """Each trainer's best configuration that fits: checkpointing off where the run fits as it is,
    on where it fits only with it (TRL's gradient_checkpointing, liandan's activation_checkpointing)."""
    from scaling import estimate_gib, plan_memory

    options = grid_options(memory_gib=20.0)
    cells = {(trainer, seq): {"size": "1.7b", "mode": "lora", "seq": seq, "rows": 1, "trainer": trainer}
             for trainer in ("liandan", "trl") for seq in (512, 2048, 8192)}  # fmt: skip
    for cell in cells.values():
        plan_memory(cell, options, bf16=True)
    for (trainer, seq), cell in cells.items():
        plain = estimate_gib(SHAPES["1.7b"], "lora", trainer, seq, seq, True)
        assert cell["checkpointing"] == (plain > 20), (trainer, seq)
        assert cell["estimate_gib"] == (estimate_gib(SHAPES["1.7b"], "lora", trainer, seq, seq, True, checkpointing=True)
                                        if cell["checkpointing"] else plain)  # fmt: skip
    assert not cells["trl", 512]["checkpointing"] and cells["trl", 2048]["checkpointing"]
    assert not cells["liandan", 512]["checkpointing"] and cells["liandan", 8192]["checkpointing"]
    assert cells["liandan", 8192]["estimate_gib"] < 20
    always = grid_options(memory_gib=20.0, checkpointing="always")
    for cell in cells.values():
        plan_memory(cell, always, bf16=True)
    assert all(cell["checkpointing"] for cell in cells.values())  # what it costs and saves, in every run


def test_profile_buckets_by_range_and_by_autograd_node():
    """A linear layer, an attention-like function and a loss, forward and backward, then AdamW:
    each op's bucket comes from the range around it, and a backward op's from the range around the
    forward op that made its autograd node (the attention's backward is attention)."""
    from scaling_profile import bucket_times, buckets
    from torch.profiler import ProfilerActivity, profile, record_function

    torch.manual_seed(0)
    layer = torch.nn.Linear(32, 32)
    optimizer = torch.optim.AdamW(layer.parameters())
    x = torch.randn(64, 32)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        with record_function("bench::forward"):
            h = layer(x)
            with record_function("bench::attention"):
                h = torch.softmax(h @ h.T, -1) @ h
            h = torch.nn.functional.silu(h)
            with record_function("bench::head_and_loss"):
                loss = (h @ layer.weight.T).logsumexp(-1).sum()
        loss.backward()
        with record_function("bench::optimizer"):
            optimizer.step()
    events = prof.events()
    placed = buckets(events)

    def bucket_of(name: str, under: str | None = None) -> set[str]:
        """The buckets of the ops called ``name`` (inside the backward of node ``under``)."""
        found = set()
        for event, place in zip(events, placed, strict=True):
            outer = event
            while under and outer is not None and not outer.name.endswith(f": {under}"):
                outer = outer.cpu_parent
            if event.name == name and outer is not None:
                found.add(place)
        return found

    assert bucket_of("aten::addmm") == {"matmuls"}  # the linear layer, forward
    assert bucket_of("aten::mm", under="AddmmBackward0") == {"matmuls"}  # ... and backward
    assert bucket_of("aten::_softmax") == {"attention"}
    assert bucket_of("aten::_softmax_backward_data", under="SoftmaxBackward0") == {"attention"}
    assert bucket_of("aten::mm", under="MmBackward0") == {"attention", "head and loss"}  # h @ h.T and the head
    assert bucket_of("aten::logsumexp") == {"head and loss"}
    assert bucket_of("aten::silu") == {"element-wise"}
    assert bucket_of("aten::silu_backward", under="SiluBackward0") == {"element-wise"}
    assert "optimizer" in bucket_of("aten::addcdiv_")
    totals = bucket_times(events)
    assert abs(sum(totals.values()) - sum(e.self_cpu_time_total for e in events)) < 1e-3


def test_runs_of_single_sizes_merge_into_one_report_and_mismatched_runs_are_refused(tiny_run, tmp_path):
    """The grid is run a size at a time (hours at 1.7B); scaling_report.py puts the runs into one
    report, each size with its own run's matmul peak, and refuses runs measured differently."""
    results, out = tiny_run
    other = json.loads(json.dumps(results))
    for c in other["cells"]:
        c["size"] = "135m"
    other["sizes"] = {"135m": {**results["sizes"]["tiny"], "matmul_peak_gflops": 99.0}}
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "results.json").write_text(json.dumps(other))
    merged_dir = tmp_path / "merged"
    report = [sys.executable, str(ROOT / "benchmarks" / "scaling_report.py")]
    done = subprocess.run([*report, str(out), str(tmp_path / "b"), "--out", str(merged_dir)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    merged = json.loads((merged_dir / "results.json").read_text())
    assert [c["size"] for c in merged["cells"]] == ["tiny"] * len(results["cells"]) + ["135m"] * len(other["cells"])
    assert merged["sizes"]["135m"]["matmul_peak_gflops"] == 99.0
    assert merged["sizes"]["tiny"] == results["sizes"]["tiny"]
    table = (merged_dir / "scaling.md").read_text()
    assert "| tiny | LoRA | 64 |" in table and "| 135M | LoRA | 64 |" in table
    xml.dom.minidom.parseString((merged_dir / "scaling.svg").read_text())

    other["settings"]["steps"] += 1
    (tmp_path / "b" / "results.json").write_text(json.dumps(other))
    done = subprocess.run([*report, str(out), str(tmp_path / "b"), "--out", str(tmp_path / "refused")], capture_output=True, text=True)
    assert done.returncode != 0 and "setting 'steps'" in done.stderr and str(tmp_path / "b") in done.stderr
    assert not (tmp_path / "refused").exists()

    done = subprocess.run([*report, str(out), str(out), "--out", str(tmp_path / "twice")], capture_output=True, text=True)
    assert done.returncode != 0 and "was measured in an earlier run too" in done.stderr


def test_liandans_estimate_counts_the_attention_probabilities_its_short_blocks_keep():
    """Blocks of up to 512 tokens attend with batched matmuls that keep (heads x seq x seq)
    probabilities a layer for backward; longer blocks go through SDPA, which keeps none. TRL's
    rows always go through SDPA."""
    from scaling import GIB, estimate_gib

    shape, tokens = SHAPES["135m"], 2048
    kept = tokens * shape.layers * shape.heads * 512 * 2 / GIB  # bf16
    short, long = (estimate_gib(shape, "lora", "liandan", tokens, seq, True) for seq in (512, 2048))
    assert short - long == pytest.approx(kept)
    assert estimate_gib(shape, "lora", "trl", tokens, 512, True) == estimate_gib(shape, "lora", "trl", tokens, 2048, True)
