"""Merge a LoRA run into its base weights: a standalone model any tool loads.

    from liandan.merge import merge
    merge("runs/persona", "models/persona-merged")
    # transformers.AutoModelForCausalLM.from_pretrained("models/persona-merged") now works

Written to a temporary directory beside the target and renamed, so a failed merge leaves nothing.
An unfinished run and weights with a NaN or an infinity are refused, naming the tensor.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch

from .checkpoints import check_run_complete, refuse_non_finite
from .errors import LiandanError
from .models import cast_weights, load_adapter_model, load_tokenizer, release_model, resolve_model


def merge(run_dir: str | Path, out_dir: str | Path, *, dtype: str = "float32") -> Path:
    """Fold the adapter of ``run_dir`` into the base weights and save to ``out_dir``."""
    out_dir = Path(out_dir)
    if dtype not in ("float32", "bfloat16", "float16"):
        raise LiandanError(f"--dtype {dtype}: expected float32, bfloat16 or float16")
    if resolve_model(str(run_dir)).kind != "adapter":
        raise LiandanError(f"'{run_dir}' is not a LoRA run directory (no adapter_config.json); a full fine-tuning run is already a standalone model")
    if out_dir.exists() and any(out_dir.iterdir()):
        raise LiandanError(f"output directory '{out_dir}' is not empty; choose another")
    check_run_complete(run_dir)

    source = resolve_model(str(run_dir))
    tokenizer = load_tokenizer(source)
    # Merge in fp32, then cast: the same weights a run directory gets when loaded as a model.
    merged = load_adapter_model(Path(source.location), tokenizer=tokenizer).merge_and_unload()
    refuse_non_finite(merged.state_dict(), f"merge of '{run_dir}'")  # a diverged run stays unmerged
    merged = cast_weights(merged, getattr(torch, dtype))
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{out_dir.name}.", dir=out_dir.parent) as tmp:
        staged = Path(tmp) / "model"
        merged.save_pretrained(staged, safe_serialization=True)
        tokenizer.save_pretrained(staged)
        if out_dir.exists():
            out_dir.rmdir()
        os.replace(staged, out_dir)
    release_model(merged)
    return out_dir
