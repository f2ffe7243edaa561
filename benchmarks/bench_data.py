"""The benchmarks' training data: 48 single-exchange chats whose answers run from 30 to 310
words, cut from the example corpus (examples/corpus/train.txt) and asked for by the general
prompts shipped with liandan. Deterministic, so every run and every peer sees the same tokens.

    from bench_data import chats, write_chats
    write_chats(Path("chats.jsonl"))          # {"messages": [...]} per line
"""

from __future__ import annotations

import json
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CORPUS = ROOT / "examples" / "corpus" / "train.txt"


def chats(count: int = 48, shortest: int = 30, longest: int = 310) -> list[list[dict]]:
    from liandan.prompts import builtin_path

    prompts = [json.loads(line)["prompt"] for line in builtin_path("general").read_text().splitlines() if line.strip()]
    words = CORPUS.read_text(encoding="utf-8").split()
    out, start = [], 0
    for i in range(count):
        # lengths spread evenly over [shortest, longest], in a shuffled but fixed order
        n = shortest + ((i * 29) % count) * (longest - shortest) // (count - 1)
        if start + n > len(words):
            start = 0
        answer = " ".join(words[start : start + n])
        start += n
        out.append([{"role": "user", "content": prompts[i % len(prompts)]}, {"role": "assistant", "content": answer}])
    return out


def write_chats(path: Path, count: int = 48) -> Path:
    path.write_text("".join(json.dumps({"messages": m}, ensure_ascii=False) + "\n" for m in chats(count)), encoding="utf-8")
    return path
