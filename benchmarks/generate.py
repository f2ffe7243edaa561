"""Generation speed: liandan's batched `generate` vs a plain one-prompt-at-a-time
``model.generate`` loop, same model object, same prompts, greedy, in one run.

    python benchmarks/generate.py [--prompts 16] [--max-new-tokens 64] [--dtype auto]

liandan sorts the prompts by length, left-pads each batch (``batch_size`` = all prompts here)
and decodes with the KV cache; the peer renders each prompt with the chat template and calls
``model.generate`` on it alone, also with the KV cache. Both stop at the model's stop tokens.
Prints each side's wall time and new tokens per second, how many answers are identical, and
``ratio: X.XX`` (peer seconds / liandan seconds). The prompts are the first N of the general
prompts shipped with liandan; the model is the built-in default.
"""

from __future__ import annotations

import argparse
import json
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--dtype", default="auto", help="auto (bf16 where the CPU has it), float32, bfloat16")
    args = parser.parse_args()

    import torch
    import transformers

    from liandan.chat import stop_token_ids
    from liandan.generation import SamplingConfig, count_until_stop, generate
    from liandan.models import load_model
    from liandan.prompts import builtin_path

    transformers.logging.set_verbosity_error()
    text = builtin_path("general").read_text()
    prompts = [json.loads(line)["prompt"] for line in text.splitlines() if line.strip()][: args.prompts]
    model, tokenizer = load_model("default", dtype=args.dtype)
    stops = stop_token_ids(tokenizer, model.generation_config)
    config = SamplingConfig(max_new_tokens=args.max_new_tokens, batch_size=len(prompts))

    generate(model, tokenizer, prompts[:2], config=SamplingConfig(max_new_tokens=4))  # warm-up, both sides
    started = time.perf_counter()
    batched = generate(model, tokenizer, prompts, config=config)
    ours = time.perf_counter() - started

    started = time.perf_counter()
    single = []
    with torch.no_grad():
        for prompt in prompts:
            ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                                return_tensors="pt", return_dict=True)  # fmt: skip
            out = model.generate(**ids, max_new_tokens=args.max_new_tokens, do_sample=False, eos_token_id=stops,
                                 pad_token_id=tokenizer.pad_token_id or stops[0])  # fmt: skip
            new = out[0, ids["input_ids"].shape[1] :].tolist()
            count, stopped = count_until_stop(new, stops)
            single.append(tokenizer.decode(new[: count - int(stopped)]))
    peer = time.perf_counter() - started

    tokens = sum(g.new_tokens for g in batched)
    same = sum(g.text == s for g, s in zip(batched, single))
    print(f"{len(prompts)} prompts, up to {args.max_new_tokens} new tokens each, greedy, dtype {model.dtype}")
    print(f"  liandan batched:        {ours:7.1f} s  {tokens / ours:7.1f} new tokens/s")
    print(f"  one at a time (peer):   {peer:7.1f} s")
    print(f"  identical answers: {same}/{len(prompts)} (batched bf16 kernels may round differently)")
    print(f"ratio: {peer / ours:.2f}")


if __name__ == "__main__":
    main()
