"""liandan serve's log-probabilities, as evaluators read them (lm-evaluation-harness's
``local-completions`` and ``local-chat-completions``): every number is checked against the
log-softmax of the model's own forward pass over the same token ids, computed here."""

from __future__ import annotations

import json
import urllib.request

import pytest
import torch
from openai import OpenAI

from liandan.chat import encode_generation_prompt
from liandan.models import load_model
from liandan.serve import create_app
from test_serve import assert_error_shape, http, running

PROMPT = "The quick brown fox jumps over the lazy dog. 请将这段话翻译成英文。"
HELLO = [{"role": "user", "content": "Question 3?"}]
JSON = {"Content-Type": "application/json"}


@pytest.fixture(scope="module")
def scorer(chat_model_dir):
    """The random chat model (it never stops by itself), with a spy on its generate() that keeps
    the token ids each call returned, so the test knows which tokens were sampled."""
    model, tokenizer = load_model(str(chat_model_dir), device="cpu", dtype="float32")
    generated: list[torch.Tensor] = []
    generate = model.generate

    def spy(*args, **kwargs):
        out = generate(*args, **kwargs)
        generated.append(out)
        return out

    model.generate = spy
    with running(create_app(model, tokenizer, model_name="scorer")) as url:
        yield OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=60), url, model, tokenizer, generated


def forward_logprobs(model, ids: list[int]) -> torch.Tensor:
    """(T, V): row t is the log-distribution of token t + 1, from one plain forward pass."""
    with torch.inference_mode():
        return torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].float(), dim=-1)


def post(url: str, body: dict) -> tuple[int, dict]:
    return http(url, json.dumps(body).encode(), JSON)


def check_completion_logprobs(logprobs: dict, text: str, expected: torch.Tensor, ids: list[int], k: int) -> None:
    """Tokens join to ``text`` at their offsets; each token's logprob is ``expected[i, ids[i]]``
    (row None: no logprob); its top are the ``k`` best of the row, sorted, with the chosen one."""
    tokens, values, tops, offsets = (logprobs[key] for key in ("tokens", "token_logprobs", "top_logprobs", "text_offset"))
    assert "".join(tokens) == text and len(tokens) == len(ids) == len(values) == len(tops) == len(offsets)
    assert offsets == [sum(len(t) for t in tokens[:i]) for i in range(len(tokens))]
    for token, value, top, row, token_id in zip(tokens, values, tops, expected, ids):
        if row is None:
            assert value is None and top is None
            continue
        assert value == pytest.approx(row[token_id].item(), abs=1e-4)
        assert list(top.values()) == sorted(top.values(), reverse=True)
        # The chosen token is listed, under its text; a likelier token that reads the same ("" inside a
        # character) keeps the key.
        assert top[token] >= value and len(top) <= k + 1
        # Each is one of the k best or the chosen one (two tokens that read the same share a key).
        best = row.topk(k).values.tolist() if k else []
        assert all(v == value or any(abs(v - b) < 1e-4 for b in best) for v in top.values())
        assert max(top.values()) == pytest.approx(max(best + [value]), abs=1e-4)


# ---------------------------------------------------------------------------------------------
# /v1/completions


def test_echo_with_max_tokens_0_scores_the_prompt_only(scorer):
    _, url, model, tokenizer, _ = scorer
    status, answer = post(f"{url}/completions", {"model": "scorer", "prompt": PROMPT, "max_tokens": 0, "echo": True,
                                                  "logprobs": 3})  # fmt: skip
    assert status == 200, answer
    ids = tokenizer(PROMPT)["input_ids"]
    (choice,) = answer["choices"]
    assert choice["text"] == tokenizer.decode(ids) == PROMPT and choice["finish_reason"] == "length"
    assert answer["usage"] == {"prompt_tokens": len(ids), "completion_tokens": 0, "total_tokens": len(ids)}
    expected = [None, *forward_logprobs(model, ids)[:-1]]  # nothing predicts the first token
    check_completion_logprobs(choice["logprobs"], PROMPT, expected, ids, 3)


def test_generated_tokens_carry_the_raw_log_softmax_not_the_sampling_distribution(scorer):
    """Sampled at temperature 1.7 with top_p 0.5: the logprobs are still the model's own."""
    _, url, model, tokenizer, generated = scorer
    before = len(generated)
    status, answer = post(f"{url}/completions", {"model": "scorer", "prompt": PROMPT, "max_tokens": 12, "logprobs": 4,
                                                  "temperature": 1.7, "top_p": 0.5, "seed": 5, "n": 2})  # fmt: skip
    assert status == 200, answer
    prompt = tokenizer(PROMPT)["input_ids"]
    (rows,) = generated[before:]
    for choice, row in zip(answer["choices"], rows.tolist()):
        assert choice["finish_reason"] == "length"  # the random model does not stop: all 12 tokens are text
        expected = forward_logprobs(model, row)[len(prompt) - 1 : -1]
        check_completion_logprobs(choice["logprobs"], choice["text"], list(expected), row[len(prompt) :], 4)


def test_echo_and_generation_together_and_streamed(scorer):
    _, url, model, _, generated = scorer
    body = {"model": "scorer", "prompt": PROMPT, "max_tokens": 6, "logprobs": 2, "echo": True, "temperature": 0}
    before = len(generated)
    status, answer = post(f"{url}/completions", body)
    assert status == 200, answer
    (row,) = generated[before:][0].tolist()
    choice = answer["choices"][0]
    assert choice["text"].startswith(PROMPT) and len(choice["text"]) > len(PROMPT)
    expected = [None, *forward_logprobs(model, row)[:-1]]
    check_completion_logprobs(choice["logprobs"], choice["text"], expected, row, 2)
    # Streamed: the prompt comes first, and the chunks' tokens join to the same lists and offsets.
    request = urllib.request.Request(f"{url}/completions", json.dumps({**body, "stream": True}).encode(), JSON)
    with urllib.request.urlopen(request, timeout=60) as response:
        events = [line[6:] for line in response.read().decode().splitlines() if line.startswith("data: ")]
    chunks = [json.loads(e)["choices"][0] for e in events[:-1]]
    assert events[-1] == "[DONE]" and chunks[0]["text"] == PROMPT
    joined = {key: [v for c in chunks if c["logprobs"] for v in c["logprobs"][key]] for key in choice["logprobs"]}
    assert joined == choice["logprobs"] and "".join(c["text"] for c in chunks) == choice["text"]


def test_token_id_prompts_are_taken_as_they_are(scorer):
    """lm-evaluation-harness sends token ids when it has the tokenizer; the text is what they decode to."""
    _, url, model, tokenizer, _ = scorer
    first, second = tokenizer("Hello world!")["input_ids"], tokenizer(" 请将这段话")["input_ids"]
    for prompt, rows in (([*first], [first]), ([first, second], [first, second])):
        status, answer = post(f"{url}/completions", {"model": "scorer", "prompt": prompt, "max_tokens": 0, "echo": True,
                                                      "logprobs": 0})  # fmt: skip
        assert status == 200, answer
        for choice, ids in zip(answer["choices"], rows):
            assert choice["text"] == tokenizer.decode(ids)
            check_completion_logprobs(choice["logprobs"], choice["text"], [None, *forward_logprobs(model, ids)[:-1]], ids, 0)
            assert all(len(top) == 1 for top in choice["logprobs"]["top_logprobs"][1:])  # logprobs 0: the chosen only
    status, answer = post(f"{url}/completions", {"model": "scorer", "prompt": [1, len(tokenizer)], "max_tokens": 1})
    assert status == 400 and assert_error_shape(answer)["param"] == "prompt"
    assert f"token id {len(tokenizer)} is not in this model's vocabulary" in answer["error"]["message"]


def test_an_lm_eval_loglikelihood_request(scorer):
    """What lm-evaluation-harness's local-completions sends for a log-likelihood and how it reads the
    answer: the continuation's logprobs are token_logprobs[ctxlen:-1] (the last is the generated token)."""
    _, url, model, tokenizer, _ = scorer
    context, continuation = tokenizer("The capital of France is")["input_ids"], tokenizer(" Paris")["input_ids"]
    status, answer = post(f"{url}/completions", {"model": "scorer", "prompt": [context + continuation], "temperature": 0,
                                                  "max_tokens": 1, "logprobs": 1, "seed": 1234, "echo": True})  # fmt: skip
    assert status == 200, answer
    logprobs = answer["choices"][0]["logprobs"]
    ctxlen = len(context)
    expected = forward_logprobs(model, context + continuation)
    want = sum(expected[i - 1, t].item() for i, t in enumerate(continuation, start=ctxlen))
    assert sum(logprobs["token_logprobs"][ctxlen:-1]) == pytest.approx(want, abs=1e-4)
    greedy = all(expected[i - 1].argmax().item() == t for i, t in enumerate(continuation, start=ctxlen))
    tops = logprobs["top_logprobs"][ctxlen:-1]
    read = all(v == max(top.values()) for v, top in zip(logprobs["token_logprobs"][ctxlen:-1], tops))
    assert read == greedy


def test_a_stop_string_keeps_only_the_tokens_before_it(scorer):
    url = scorer[1]
    body = {"model": "scorer", "prompt": PROMPT, "max_tokens": 10, "logprobs": 1, "temperature": 0}
    full = post(f"{url}/completions", body)[1]["choices"][0]
    tokens = full["logprobs"]["tokens"]
    stop = next(t for t in tokens[3:] if t.strip())  # a token well inside the text
    cut = post(f"{url}/completions", {**body, "stop": stop})[1]["choices"][0]
    assert cut["finish_reason"] == "stop" and cut["text"] == full["text"][: full["text"].index(stop)]
    kept = cut["logprobs"]["tokens"]
    assert "".join(kept).startswith(cut["text"]) and all(o < len(cut["text"]) or not t for o, t in
                                                         zip(cut["logprobs"]["text_offset"], kept))  # fmt: skip
    assert kept == tokens[: len(kept)]


@pytest.mark.parametrize(
    ("body", "param"),
    [({"logprobs": -1}, "logprobs"), ({"logprobs": 21}, "logprobs"), ({"logprobs": True}, "logprobs"),
     ({"echo": 1}, "echo"), ({"max_tokens": 0}, "max_tokens"), ({"top_logprobs": 2}, "top_logprobs"),
     ({"prompt": [1, -2]}, "prompt"), ({"prompt": []}, "prompt"), ({"prompt": [[1], "a"]}, "prompt")],
)  # fmt: skip
def test_bad_completion_logprob_values_are_400(scorer, body, param):
    status, answer = post(f"{scorer[1]}/completions", {"model": "scorer", "prompt": "Hi", **body})
    assert status == 400 and assert_error_shape(answer)["param"] == param


# ---------------------------------------------------------------------------------------------
# /v1/chat/completions


def test_chat_logprobs_are_the_models_own_with_sorted_top_logprobs(scorer):
    client, _, model, tokenizer, generated = scorer
    before = len(generated)
    reply = client.chat.completions.create(model="scorer", messages=HELLO, max_tokens=8, temperature=0, logprobs=True,
                                           top_logprobs=3)  # fmt: skip
    (row,) = generated[before:][0].tolist()
    prompt = encode_generation_prompt(tokenizer, HELLO)
    expected = forward_logprobs(model, row)[len(prompt) - 1 : -1]
    content = reply.choices[0].logprobs.content
    assert "".join(t.token for t in content) == reply.choices[0].message.content and len(content) == 8
    for entry, token_id, row_logprobs in zip(content, row[len(prompt) :], expected):
        assert entry.logprob == pytest.approx(row_logprobs[token_id].item(), abs=1e-4)
        assert entry.bytes == list(entry.token.encode())
        top = [t.logprob for t in entry.top_logprobs]
        assert top == pytest.approx(row_logprobs.topk(3).values.tolist(), abs=1e-4) and top == sorted(top, reverse=True)
        assert entry.logprob == top[0] and entry.token == entry.top_logprobs[0].token  # greedy: the chosen is the best
    plain = client.chat.completions.create(model="scorer", messages=HELLO, max_tokens=8, temperature=0)
    assert plain.choices[0].logprobs is None and plain.choices[0].message.content == reply.choices[0].message.content


def test_streamed_chat_carries_the_same_logprobs(scorer):
    client = scorer[0]
    options = {"model": "scorer", "messages": HELLO, "max_tokens": 12, "temperature": 0, "logprobs": True, "top_logprobs": 2}
    plain = client.chat.completions.create(**options).choices[0]
    chunks = list(client.chat.completions.create(**options, stream=True))
    streamed = [t for c in chunks for choice in c.choices if choice.logprobs for t in choice.logprobs.content]
    assert [t.model_dump() for t in streamed] == [t.model_dump() for t in plain.logprobs.content]
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == plain.message.content


@pytest.mark.parametrize(
    ("body", "param"),
    [({"top_logprobs": 2}, "top_logprobs"), ({"logprobs": False, "top_logprobs": 0}, "top_logprobs"),
     ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"), ({"logprobs": True, "top_logprobs": -1}, "top_logprobs"),
     ({"logprobs": 1}, "logprobs"), ({"echo": True}, "echo"), ({"max_tokens": 0}, "max_tokens")],
)  # fmt: skip
def test_bad_chat_logprob_values_are_400(scorer, body, param):
    status, answer = post(f"{scorer[1]}/chat/completions", {"model": "scorer", "messages": HELLO, **body})
    assert status == 400 and assert_error_shape(answer)["param"] == param
