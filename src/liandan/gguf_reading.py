"""Reading GGUF files with transformers: the file check, the de-quantized model made plain, and
the one-time conversion of a GGUF model to a safetensors Hugging Face directory.

    from liandan.gguf_reading import check_gguf_file, convert_gguf
    check_gguf_file(Path("model.gguf"))                 # LiandanError unless it starts with GGUF
    convert_gguf(Path("model.gguf"), Path("model-dir"))  # config.json + model.safetensors + tokenizer

Writing GGUF files is `liandan.export`'s job.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from .errors import LiandanError


def check_gguf_file(path: Path) -> None:
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise LiandanError(f"'{path}' is not a GGUF file (it does not start with the GGUF magic bytes)")


def drop_quantizer(model: Any) -> None:
    """A GGUF-loaded model is already de-quantized; forget the GGUF quantizer so it saves as a
    plain model and later code does not treat it as quantized."""
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    if hasattr(model, "is_quantized"):
        model.is_quantized = False


def convert_gguf(gguf_path: Path, out_dir: Path) -> None:
    """Read a GGUF model with transformers (fp32) and save it as a safetensors Hugging Face
    directory, its tokenizer with a pad token (eos where it has none) beside it."""
    check_gguf_file(gguf_path)
    where, name = str(gguf_path.parent), gguf_path.name
    try:
        tokenizer = AutoTokenizer.from_pretrained(where, gguf_file=name)
        model = AutoModelForCausalLM.from_pretrained(where, gguf_file=name, dtype=torch.float32)
    except Exception as exc:  # transformers raises many types for a damaged file; one line for the user
        first = str(exc).strip().splitlines()
        raise LiandanError(f"could not read the GGUF model '{gguf_path}': {first[0] if first else type(exc).__name__}") from exc
    if tokenizer.pad_token_id is None and tokenizer.eos_token_id is not None:
        tokenizer.pad_token = tokenizer.eos_token
    drop_quantizer(model)
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
