"""Peak memory of comparing two models: liandan's one-at-a-time `compare` vs one model alone
and vs the naive way (both models loaded at once), each in a fresh process.

    python benchmarks/compare_memory.py [float32|bfloat16]

Uses the built-in default model twice (as ``default`` and as its cache directory), so both
models are the same size: the ideal is a ratio of 1.0 against one model alone.
"""

from __future__ import annotations

import json
import subprocess
import sys

CHILD = r"""
import json, resource, sys
import transformers
transformers.logging.set_verbosity_error(); transformers.utils.logging.disable_progress_bar()
from liandan.comparison import compare
from liandan.generation import SamplingConfig, generate
from liandan.default_model import default_model_dir
from liandan.models import load_model
which = sys.argv[1]
specs = ["default", str(default_model_dir())]
config = SamplingConfig(max_new_tokens=16)
prompts = ["What is the capital of France?"]
dtype = sys.argv[2]
load = lambda spec: load_model(spec, dtype=dtype)
if which == "one":
    compare(specs[:1], prompts, config=config, load=load)
elif which == "compare":
    compare(specs, prompts, config=config, load=load)
else:  # naive: hold both, then generate with each
    loaded = [load(s) for s in specs]
    for model, tok in loaded:
        generate(model, tok, prompts, config=config)
print(json.dumps({"peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def peak(which: str, dtype: str) -> float:
    out = subprocess.run([sys.executable, "-c", CHILD, which, dtype], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])["peak_mib"]


def main() -> None:
    from liandan.default_model import ensure_default_model

    ensure_default_model()
    dtype = sys.argv[1] if len(sys.argv) > 1 else "float32"
    one, two, naive = peak("one", dtype), peak("compare", dtype), peak("naive", dtype)
    print(f"[{dtype}] peak RSS, libraries (~0.7 GiB) included:")
    print(f"  one model alone:                  {one:7.0f} MiB")
    print(f"  compare of two (liandan):         {two:7.0f} MiB  ({two / one:.2f}x one model)")
    print(f"  both loaded at once (naive peer): {naive:7.0f} MiB  ({naive / one:.2f}x one model)")


if __name__ == "__main__":
    main()
