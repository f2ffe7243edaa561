"""GRPO's rollouts: ``group`` samples of every prompt, each prompt prefilled once.

    from liandan.generation import SamplingConfig
    from liandan.group_sampling import sample_groups
    model.eval()
    new_ids = sample_groups(model, [prompt_a, prompt_b], group=4, config=SamplingConfig(temperature=1.0),
                            stops=[eos_id], pad_id=pad_id)   # 8 lists of new token ids, prompt a's first

transformers' ``generate(num_return_sequences=G)`` repeats every prompt G times *before* the
prefill, so each prompt is prefilled G times, and it keeps computing a finished row until the
longest row of the batch ends. With the default 135M model on a CPU, 4 prompts x 4 samples x 64
tokens took ~20 s a step: the prefill of 16 rows x 46 tokens ~3.4 s, and a decode step 271 ms at
16 rows against 104 ms at 1, while the mean completion was 32 tokens of 64.

`sample_groups` prefills the distinct prompts once (left-padded, the output head at the last
position only), repeats the KV cache and the last logits G times (``Cache.batch_repeat_interleave``),
then decodes with the cache and drops each row from the batch as soon as it produces a stop token
(``Cache.batch_select_indices``), so a step computes only the rows still running. On that step
(LoRA r16, one thread) it took 16.7 s against generate's 22.9 s (3 runs each): the steps still
number as many as the longest row's tokens, and a step of a few rows costs nearly one of 16.

Each row is what ``generate`` computes for it: the same position ids (from the attention mask,
then +1 a step), the same 2D mask (none when no prompt is padded), float32 logits through
transformers' own processors in generate's order (repetition penalty ignoring the left padding,
then temperature, top-k, top-p), argmax or ``torch.multinomial``. The random stream differs (one
draw per live row, not per batch row), so a seed gives other samples than generate, but the same
ones each time.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Any

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer
from transformers.generation.logits_process import (
    LogitsProcessorList,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from .attention import own_model
from .errors import LiandanError
from .generation import SamplingConfig, count_until_stop, generation_config

# Cache layers whose whole state is keys and values, so that repeating or selecting batch rows of
# the cache repeats or selects everything a row carries. A recurrent (linear attention, Mamba)
# layer has no such methods; a static layer is allocated for a fixed batch.
REGROUPABLE_LAYERS = (DynamicLayer, DynamicSlidingWindowLayer)


def sample_groups(
    model: Any, prompts: list[list[int]], group: int, config: SamplingConfig, stops: Sequence[int], pad_id: int
) -> list[list[int]]:
    """``len(prompts) * group`` lists of new token ids, prompt-major (row r samples prompt
    ``r // group``, the order of ``generate(num_return_sequences=group)``). Each ends at and
    includes its first stop token (an id of ``stops``), or is ``config.max_new_tokens`` long.

    ``group`` is the number of samples per prompt (``config.num_samples`` and ``batch_size`` are
    not read: the caller batches). Runs on the model's device under ``torch.inference_mode``; the
    caller sets eval mode, autocast and the seed. A PEFT model samples with its adapters on.

    A model whose KV cache cannot be repeated and narrowed row by row (see `unsupported_reason`)
    is sampled by transformers' ``generate`` instead, as `liandan.generation._generate_batch`
    samples: correct, without the savings.
    """
    if group < 1:
        raise LiandanError(f"group must be at least 1 (got {group})")
    for i, prompt in enumerate(prompts):
        if not prompt:
            raise LiandanError(f"prompt {i} has no tokens: nothing to continue from")
    if not prompts:
        return []
    if unsupported_reason(model, prompts, config) is not None:
        return _generate_fallback(model, prompts, group, config, stops, pad_id)
    with torch.inference_mode():
        return _prefill_once_decode(model, prompts, group, config, stops, pad_id)


def unsupported_reason(model: Any, prompts: list[list[int]], config: SamplingConfig) -> str | None:
    """Why ``model`` must be sampled by ``generate`` instead, or None. Every family liandan trains
    (Llama, Qwen 2/3 and Qwen3-MoE, Mistral, Gemma 2/3, Phi-3) decodes with a DynamicCache of
    full and sliding-window layers, which this module handles."""
    inner = own_model(model)
    if not {"cache", "attention_mask", "position_ids"} <= set(inspect.signature(inner.forward).parameters):
        return f"{type(inner).__name__}.forward takes no cache, attention_mask or position_ids"
    text_config = inner.config.get_text_config(decoder=True)
    layers = DynamicCache(config=text_config).layers  # empty: created on use, all DynamicLayer
    odd = sorted({type(layer).__name__ for layer in layers if type(layer) not in REGROUPABLE_LAYERS})
    if odd:
        return f"its cache has {', '.join(odd)} layers, whose rows cannot be repeated or dropped"
    # Phi-3 switches to its long RoPE factors past this length and then recomputes the whole
    # cache inside `generate`; a cache carried step by step would keep the short-factor keys.
    limit = getattr(text_config, "original_max_position_embeddings", None)
    if isinstance(limit, int) and max(map(len, prompts)) + config.max_new_tokens > limit:
        return f"prompt + completion may pass original_max_position_embeddings ({limit})"
    return None


def logits_processors(config: SamplingConfig, prompt_pads: torch.Tensor) -> LogitsProcessorList:
    """transformers' processors for ``config``, in the order ``generate`` applies them.
    ``prompt_pads`` (rows,) counts each row's left padding, which the repetition penalty skips.
    ``top_k`` 0 means off, as `SamplingConfig` says."""
    processors = LogitsProcessorList()
    if config.repetition_penalty != 1.0:
        processors.append(RepetitionPenaltyLogitsProcessor(float(config.repetition_penalty), prompt_ignore_length=prompt_pads))
    if not config.is_greedy:
        if config.temperature != 1.0:
            processors.append(TemperatureLogitsWarper(float(config.temperature)))
        if config.top_k > 0:
            processors.append(TopKLogitsWarper(config.top_k))
        if config.top_p < 1.0:
            processors.append(TopPLogitsWarper(float(config.top_p)))
    return processors


def left_pad(prompts: list[list[int]], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids, attention_mask)``, both (B, T): each prompt right-aligned, so every row's new
    token follows its prompt directly."""
    width = max(map(len, prompts))
    ids = [[pad_id] * (width - len(p)) + list(p) for p in prompts]
    mask = [[0] * (width - len(p)) + [1] * len(p) for p in prompts]
    return torch.tensor(ids, device=device), torch.tensor(mask, device=device)


def _prefill_once_decode(model, prompts, group, config, stops, pad_id) -> list[list[int]]:
    inner = own_model(model)
    ids, mask = left_pad(prompts, pad_id, model.device)  # (B, T)
    # generate's position ids: counted over real tokens, 0 on the padding
    positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)
    prompt_pads = (mask == 0).sum(-1)  # (B,)
    attention_mask = None if bool(mask.all()) else mask  # generate drops a mask of ones
    cache = DynamicCache(config=inner.config.get_text_config(decoder=True))
    keep_last = {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(inner.forward).parameters else {}
    logits = model(input_ids=ids, attention_mask=attention_mask, position_ids=positions, cache=cache, use_cache=True,
                   **keep_last).logits[:, -1].float()  # (B, V)  # fmt: skip

    # One prefill per prompt, then `group` rows each: row r continues prompt r // group.
    cache.batch_repeat_interleave(group)
    logits = logits.repeat_interleave(group, dim=0)  # (B * G, V)
    sequences = ids.repeat_interleave(group, dim=0)  # (B * G, T): what the repetition penalty reads
    attention_mask = None if attention_mask is None else attention_mask.repeat_interleave(group, dim=0)
    position = positions[:, -1:].repeat_interleave(group, dim=0)  # (B * G, 1)
    prompt_pads = prompt_pads.repeat_interleave(group, dim=0)
    rows = torch.arange(len(prompts) * group, device=ids.device)  # output row of each live row
    processors = logits_processors(config, prompt_pads)
    stop_ids = torch.tensor(sorted(set(stops)), dtype=torch.long, device=ids.device)
    outputs: list[list[int]] = [[] for _ in range(len(rows))]

    for step in range(config.max_new_tokens):
        scores = processors(sequences, logits)
        if config.is_greedy:
            tokens = scores.argmax(dim=-1)
        else:
            tokens = torch.multinomial(torch.softmax(scores, dim=-1), num_samples=1).squeeze(1)  # (live,)
        for row, token in zip(rows.tolist(), tokens.tolist()):
            outputs[row].append(token)
        finished = torch.isin(tokens, stop_ids)
        if step == config.max_new_tokens - 1 or bool(finished.all()):
            break
        sequences = torch.cat([sequences, tokens[:, None]], dim=-1)
        if bool(finished.any()):  # drop the rows that stopped, from every per-row state
            live = (~finished).nonzero().squeeze(1)
            cache.batch_select_indices(live)
            rows, sequences, tokens, position, prompt_pads = (t[live] for t in (rows, sequences, tokens, position, prompt_pads))
            attention_mask = None if attention_mask is None else attention_mask[live]
            processors = logits_processors(config, prompt_pads)
        position = position + 1
        if attention_mask is not None:
            attention_mask = torch.cat([attention_mask, attention_mask.new_ones((len(rows), 1))], dim=-1)
        logits = model(input_ids=tokens[:, None], attention_mask=attention_mask, position_ids=position, cache=cache,
                       use_cache=True, **keep_last).logits[:, -1].float()  # (live, V)  # fmt: skip
    return outputs


def _generate_fallback(model, prompts, group, config, stops, pad_id) -> list[list[int]]:
    """transformers' ``generate`` with `liandan.generation.generation_config`, as
    `liandan.generation._generate_batch` runs it (that function pads with a tokenizer, which this
    signature does not carry), each row cut after its first stop."""
    ids, mask = left_pad(prompts, pad_id, model.device)
    # Greedy rows of a prompt are all the same, and generate refuses to repeat them itself.
    samples = 1 if config.is_greedy else group
    gen_config = generation_config(config, stops, pad_id, num_return_sequences=samples)
    with torch.inference_mode():
        output = model.generate(input_ids=ids, attention_mask=mask, generation_config=gen_config)
    new = output[:, ids.shape[1] :].tolist()  # (B * samples, new)
    return [row[: count_until_stop(row, stops)[0]] for row in new for _ in range(group // samples)]
