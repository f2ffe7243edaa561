"""Evaluating tool calling: the ``tool_call`` check, calls read in each evaluated model's own
format, ``--tools-template``, and what the result and report show."""

import json

import pytest
from typer.testing import CliRunner

from conftest import CHATML, build_model_dir, build_tokenizer, write_jsonl
from liandan.checks import parse_checks, run_checks
from liandan.cli import app
from liandan.errors import LiandanError
from liandan.eval_report import render_html, render_markdown
from liandan.eval_values import format_call, pass_rates
from liandan.eval_sets import read_eval_set, score_set
from liandan.evaluation import EvalConfig, Evaluation, evaluate
from liandan.tools import Reply, call_format, with_tools_template

runner = CliRunner()

WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Get the current weather in a city.", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}, "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
    "required": ["city"], "additionalProperties": False}}}  # fmt: skip
TIME = {"type": "function", "function": {"name": "get_time", "description": "Get the local time in a city.", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"], "additionalProperties": False}}}  # fmt: skip
TOOLS = (WEATHER, TIME)

# A template of another family: calls as <call>{"fn", "args"}</call>, so the same text reads differently.
OTHER_FORMAT = (
    "{% if tools %}<|im_start|>system\n{% for t in tools %}{{ t | tojson }}\n{% endfor %}<|im_end|>\n{% endif %}"
    "{% for m in messages %}<|im_start|>{{ m.role }}\n"
    "{% if m.tool_calls %}{% for c in m.tool_calls %}<call>{{ {'fn': c.function.name, 'args': c.function.arguments} | tojson }}</call>{% endfor %}"
    "{% else %}{{ m.content }}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def call(name, **arguments):
    return {"type": "function", "function": {"name": name, "arguments": arguments}}


def chatml_call(name, **arguments):
    """A call as liandan's ChatML tools template writes it."""
    return "<tool_call>\n" + json.dumps({"name": name, "arguments": arguments}) + "\n</tool_call>"


def verdict(mode, reply, expected=None, tools=TOOLS):
    checks = parse_checks({"tool_call": mode}, where="t.jsonl:1", reference_calls=expected, tools=tools)
    return run_checks(checks, reply.content, None, reply)["tool_call"]


OSLO = [call("get_weather", city="Oslo")]


@pytest.mark.parametrize("reply, expected, passes", [
    (Reply("", [call("get_weather", city="Oslo")]), OSLO, True),
    (Reply("Let me look.", [call("get_weather", city="Oslo")]), OSLO, True),  # text beside the call is not judged
    (Reply("", [call("get_time", city="Oslo")]), OSLO, False),  # wrong function
    (Reply("", [call("get_weather", city="Bergen")]), OSLO, False),  # wrong argument
    (Reply("", [call("get_weather", city="Oslo", unit="celsius")]), OSLO, False),  # an argument too many
    (Reply("", [call("get_weather", city="Oslo"), call("get_time", city="Oslo")]), OSLO, False),  # an extra call
    (Reply("It is sunny in Oslo.", []), OSLO, False),  # no call where one is needed
    (Reply("", [call("get_weather", city="Oslo")], "call 2 is not valid JSON: Expecting value"), OSLO, False),  # begun, unreadable
    (Reply("Paris.", []), None, True),  # no call needed, none made
    (Reply("", [call("get_weather", city="Paris")]), None, False),  # no call needed, one made
    (Reply("", [], "call 1: no function name at name"), None, False),  # a broken call is a call made
    # two calls: the same order as the reference, arguments compared as JSON values
    (Reply("", [call("get_time", city="Oslo"), call("get_weather", city="Rome")]),
     [call("get_time", city="Oslo"), call("get_weather", city="Rome")], True),
    (Reply("", [call("get_weather", city="Rome"), call("get_time", city="Oslo")]),
     [call("get_time", city="Oslo"), call("get_weather", city="Rome")], False),
    (Reply("", [call("get_time", city="Oslo")]), [call("get_time", city="Oslo"), call("get_weather", city="Rome")], False),
])  # fmt: skip
def test_exact_compares_every_call_with_the_reference_in_order(reply, expected, passes):
    assert verdict("exact", reply, expected) is passes


def test_exact_compares_arguments_as_json_values():
    expected = [call("convert", value=2, units={"from": "km", "to": "mi"})]
    assert verdict("exact", Reply("", [call("convert", units={"to": "mi", "from": "km"}, value=2.0)]), expected, tools=None)
    assert not verdict("exact", Reply("", [call("convert", units={"to": "mi", "from": "km"}, value="2")]), expected, tools=None)


@pytest.mark.parametrize("reply, expected, passes", [
    (Reply("", [call("get_weather", city="Bergen")]), OSLO, True),  # another city: still a valid call to the right tool
    (Reply("", [call("get_weather", city="Oslo", unit="fahrenheit")]), OSLO, True),
    (Reply("", [call("get_weather", city="Oslo", unit="kelvin")]), OSLO, False),  # not in the enum
    (Reply("", [call("get_weather", unit="celsius")]), OSLO, False),  # a required argument missing
    (Reply("", [call("get_weather", city="Oslo", country="NO")]), OSLO, False),  # additionalProperties: false
    (Reply("", [call("get_weather", city=7)]), OSLO, False),  # wrong type
    (Reply("", [call("get_time", city="Oslo")]), OSLO, False),  # valid, but not the function the reference calls
    (Reply("", [call("get_weather", city="Oslo"), call("get_time", city="Oslo")]), OSLO, False),  # one call too many
    (Reply("", [call("book_flight", city="Oslo")]), OSLO, False),  # no such tool
    (Reply("", [call("get_weather", city="Oslo")], "call 2: no function name at name"), OSLO, False),
    (Reply("Paris.", []), None, True),
    (Reply("", [call("get_weather", city="Paris")]), None, False),  # a valid call, where none is needed
])  # fmt: skip
def test_schema_checks_each_call_against_its_tool(reply, expected, passes):
    assert verdict("schema", reply, expected) is passes


@pytest.mark.parametrize("mode, expected, tools, message", [
    ("fuzzy", OSLO, TOOLS, r"t.jsonl:1: field 'checks.tool_call': expected one of exact, schema \(got 'fuzzy'\)"),
    ("exact", None, None, r"field 'checks.tool_call': .* this record has no 'tools' and no reference turn with 'tool_calls'"),
    ("schema", OSLO, None, r"field 'checks.tool_call': 'schema' checks each call against the record's tools, and this record has no"),
    ("schema", [call("book_flight", city="Oslo")], TOOLS, r"the reference calls 'book_flight', which is not one of the record's tools"),
    ("schema", OSLO, ({"type": "function", "function": {"name": "get_weather", "parameters": {"type": "objekt"}}},),
     r"tools\[0\].function.parameters: not a valid JSON Schema"),
])  # fmt: skip
def test_bad_tool_call_checks_name_the_record_and_field(mode, expected, tools, message):
    with pytest.raises(LiandanError, match=message):
        parse_checks({"tool_call": mode}, where="t.jsonl:1", reference_calls=expected, tools=tools)


def test_a_tool_call_check_without_a_parsed_reply_is_an_error_not_a_fail():
    checks = parse_checks({"tool_call": "exact", "contains": "Oslo"}, where="t.jsonl:4", reference_calls=OSLO, tools=TOOLS)
    with pytest.raises(LiandanError, match=r"t.jsonl:4: field 'checks.tool_call': reads the calls of a reply parsed"):
        run_checks(checks, chatml_call("get_weather", city="Oslo"))
    # text checks read the raw text; the call check reads the reply
    reply = Reply("", [call("get_weather", city="Oslo")])
    assert run_checks(checks, chatml_call("get_weather", city="Oslo"), None, reply) == {"tool_call": True, "contains": True}


# ---------------------------------------------------------------------------------------------
# Task sets and scoring with the evaluated model's format


def tool_records():
    """Two records needing a call, one needing none, and one whose call and result are already there."""
    ask = [{"role": "user", "content": "Weather in Oslo?"}]
    done = [*ask, {"role": "assistant", "content": "", "tool_calls": [{"id": "c1", "type": "function", "function": {
        "name": "get_weather", "arguments": '{"city": "Oslo"}'}}]},
        {"role": "tool", "tool_call_id": "c1", "name": "get_weather", "content": '{"temperature": 4}'}]  # fmt: skip
    return [
        {"id": "w", "category": "single_call", "tools": list(TOOLS), "checks": {"tool_call": "exact"}, "messages": [
            *ask, {"role": "assistant", "content": "", "tool_calls": [{"type": "function", "function": {
                "name": "get_weather", "arguments": '{"city": "Oslo"}'}}]}]},
        {"id": "t", "category": "single_call", "tools": list(TOOLS), "messages": [  # tool_call: exact by default
            {"role": "user", "content": "Time in Rome?"}, {"role": "assistant", "content": "", "tool_calls": [
                {"type": "function", "function": {"name": "get_time", "arguments": {"city": "Rome"}}}]}]},
        {"id": "n", "category": "no_call", "tools": list(TOOLS), "checks": {"tool_call": "exact"}, "messages": [
            {"role": "user", "content": "Capital of France?"}, {"role": "assistant", "content": "Paris."}]},
        {"id": "f", "category": "final_answer", "tools": list(TOOLS), "checks": {"tool_call": "exact"}, "messages": [
            *done, {"role": "assistant", "content": "It is 4 °C in Oslo."}]},
    ]  # fmt: skip


@pytest.fixture
def tool_set(tmp_path):
    return write_jsonl(tmp_path / "tools.jsonl", tool_records())


def generations(*texts):
    from types import SimpleNamespace

    return [SimpleNamespace(text=t, stopped=True, new_tokens=9) for t in texts]


def test_reference_turns_keep_their_calls_and_no_call_records_are_not_compared_word_for_word(tool_set):
    task = read_eval_set(tool_set, name="task")
    assert [i.reference_calls for i in task.items] == [OSLO, [call("get_time", city="Rome")], None, None]
    assert [i.reference for i in task.items] == [None, None, "Paris.", "It is 4 °C in Oslo."]
    assert all(list(i.checks.tests) == ["tool_call"] for i in task.items)  # no 'reference: exact' added beside it
    assert task.items[3].prompt.messages[-1]["role"] == "tool" and task.items[3].prompt.tools == TOOLS
    assert task.tool_item is task.items[0]
    # --check tool_call=schema switches every record to the schema comparison
    loose = read_eval_set(tool_set, name="task", extra_checks={"tool_call": "schema"})
    bergen = Reply("", [call("get_weather", city="Bergen")])
    assert run_checks(loose.items[0].checks, "", None, bergen) == {"tool_call": True}
    assert run_checks(task.items[0].checks, "", None, bergen) == {"tool_call": False}


def test_replies_are_read_in_the_evaluated_models_own_format(tool_set):
    task = read_eval_set(tool_set, name="task")
    chatml = build_tokenizer(CHATML, "<|im_end|>")
    with_tools_template(chatml, "chatml")
    texts = [chatml_call("get_weather", city="Oslo"),  # right
             "Sure! " + chatml_call("get_time", city="Paris"),  # wrong argument
             "Paris is the capital.",  # no call, as needed
             '<tool_call>\n{"name": "get_weather", "arguments": {"city": }\n</tool_call>']  # fmt: skip
    outcomes, aggregate = score_set(task, generations(*texts), call_format(chatml))
    assert [o["checks"] for o in outcomes] == [{"tool_call": v} for v in (True, False, True, False)]
    assert outcomes[0]["calls"] == OSLO and outcomes[1]["calls"] == [call("get_time", city="Paris")] and outcomes[2]["calls"] == []
    assert outcomes[3]["call_problem"].startswith("call 1 is not valid JSON") and "call_problem" not in outcomes[0]
    assert [o["expects_call"] for o in outcomes] == [True, True, False, False]
    assert aggregate["tool_call"] == 0.5 and aggregate["call"] == 0.5 and aggregate["no_call"] == 0.5
    assert aggregate["by_category"] == {"final_answer": 0.0, "no_call": 1.0, "single_call": 0.5}

    # the same texts under a template that writes calls as <call>{"fn", "args"}</call>: the ChatML
    # blocks are plain text there, and its own blocks are calls
    other = call_format(build_tokenizer(OTHER_FORMAT, "<|im_end|>"))
    outcomes, _ = score_set(task, generations(texts[0], '<call>{"fn": "get_time", "args": {"city": "Rome"}}</call>', *texts[2:]), other)
    assert [o["checks"]["tool_call"] for o in outcomes] == [False, True, True, True]
    assert outcomes[0]["calls"] == [] and outcomes[1]["calls"] == [call("get_time", city="Rome")]


def test_scoring_a_tool_call_check_without_a_call_format_is_refused(tool_set):
    task = read_eval_set(tool_set, name="task")
    with pytest.raises(LiandanError, match=r"tools.jsonl:1: field 'checks.tool_call'"):
        score_set(task, generations("a", "b", "c", "d"))


# ---------------------------------------------------------------------------------------------
# Models: the tools template, the error without it, end to end


@pytest.fixture(scope="module")
def other_format_dir(tmp_path_factory):
    """A model whose own template renders tools (as a run trained with one does), in another format."""
    return build_model_dir(tmp_path_factory.mktemp("other-format"), OTHER_FORMAT, "<|im_end|>")


def never_load(spec):
    raise AssertionError(f"loaded {spec} before the tools were checked")


def test_a_model_that_cannot_render_tools_is_refused_before_any_model_loads(chat_model_dir, other_format_dir, tool_set):
    # the second model is fine; the first (plain ChatML) cannot render tools: found before anything loads
    config = EvalConfig(models=[str(other_format_dir), str(chat_model_dir)], task=str(tool_set), probes="none", drift="none")
    with pytest.raises(LiandanError) as error:
        evaluate(config, load=never_load)
    message = str(error.value)
    assert message.startswith(f"{tool_set}:1: this record uses tools, but model '{chat_model_dir}' cannot render them: its chat template leaves out")
    assert "pass --tools-template chatml" in message


def test_tools_template_settings_are_checked(tmp_path, chat_model_dir, tool_set):
    with pytest.raises(LiandanError, match=r"--tools-template 'llama': expected chatml or a .jinja file that exists"):
        EvalConfig(tools_template="llama")
    plain = write_jsonl(tmp_path / "plain.jsonl", [{"prompt": "hi", "checks": {"contains": "hi"}}])
    with pytest.raises(LiandanError, match=r"--tools-template chatml: changes nothing here, as no task record offers tools"):
        Evaluation(EvalConfig(task=str(plain), tools_template="chatml", probes="none", drift="none"))
    # liandan's ChatML tools template on a model whose template is not ChatML: refused, naming the model
    alpaca = "{% for m in messages %}### {{ m.role }}:\n{{ m.content }}\n\n{% endfor %}{% if add_generation_prompt %}### assistant:\n{% endif %}"
    model = build_model_dir(tmp_path / "alpaca", alpaca, "<|endoftext|>")
    config = EvalConfig(models=[str(model)], task=str(tool_set), tools_template="chatml", probes="none", drift="none")
    with pytest.raises(LiandanError, match=rf"model '{model}': --tools-template: 'chatml' is for models whose chat template is ChatML"):
        evaluate(config, load=never_load)


def test_evaluate_a_tools_set_before_and_after(monkeypatch, chat_model_dir, other_format_dir, tool_set):
    """The plain ChatML model gets the tools template; the model whose template renders tools keeps
    its own and is read in its own format. Random models make no calls: the records needing none pass."""
    from liandan import evaluation
    from liandan.tools import chatml_tools_template

    seen = []  # the template each model generates with, and whether the prompts carry the tools

    def generate(model, tokenizer, prompts, **kw):
        seen.append((tokenizer.chat_template, [p.tools for p in prompts]))
        return real_generate(model, tokenizer, prompts, **kw)

    real_generate = evaluation.generate
    monkeypatch.setattr(evaluation, "generate", generate)
    before, after = str(chat_model_dir), str(other_format_dir)
    config = EvalConfig(models=[before, after], task=str(tool_set), probes="none", drift="none", tools_template="chatml",
                        max_new_tokens=6, dtype="float32")  # fmt: skip
    result = evaluate(config)
    assert [template for template, _ in seen] == [chatml_tools_template(None), OTHER_FORMAT]
    assert all(tools == [TOOLS] * 4 for _, tools in seen)
    keys = [m["key"] for m in result["metrics"]]
    assert keys[:4] == ["task.score", "task.tool_call", "task.call", "task.no_call"]
    labels = {m["key"]: m["label"] for m in result["metrics"]}
    assert labels["task.call"] == "Task: the right call, where one is needed" and labels["task.no_call"] == "Task: no call, where none is needed"
    assert result["notes"] == [f"{before}: the model's chat template renders no tools, so it now uses liandan's ChatML tools template"]
    assert result["settings"]["tools_template"] == "chatml"
    examples = result["sets"][0]["examples"]
    assert [e["reference_calls"] for e in examples] == [OSLO, [call("get_time", city="Rome")], None, None]
    for model in (before, after):
        scores = result["scores"][model]["task"]
        assert scores["call"] == 0.0 and set(scores["by_category"]) == {"single_call", "no_call", "final_answer"}
        outputs = [e["outputs"][model] for e in examples]
        assert all(isinstance(o["calls"], list) for o in outputs)
        assert [o["expects_call"] for o in outputs] == [True, True, False, False]
        for o in outputs[2:]:  # no call needed: passes exactly when the model made none
            assert o["checks"]["tool_call"] is (o["calls"] == [] and "call_problem" not in o)
        assert scores["no_call"] == sum(o["checks"]["tool_call"] for o in outputs[2:]) / 2
    task_call = next(m for m in result["metrics"] if m["key"] == "task.call")
    assert task_call["intervals"][after]["n"] == 2  # paired over the two records that need a call
    assert result["bars"][0]["title"] == "Task by category: all checks pass"
    assert set(result["bars"][0]["groups"]) == {"single_call", "no_call", "final_answer"}
    page = render_html(result)
    assert "get_weather({&quot;city&quot;: &quot;Oslo&quot;})" in page and "no call" in page
    json.loads(json.dumps(result))


def test_eval_cli_takes_tools_template(tmp_path, chat_model_dir, tool_set):
    args = ["eval", "--model", str(chat_model_dir), "--task", str(tool_set), "--probes", "none", "--drift", "none",
            "--max-new-tokens", "3", "--dtype", "float32"]  # fmt: skip
    out = tmp_path / "r.json"
    refused = runner.invoke(app, [*args, "--out", str(out)])
    assert refused.exit_code == 2 and "--tools-template chatml" in " ".join(refused.stderr.split()) and not out.exists()
    done = runner.invoke(app, [*args, "--tools-template", "chatml", "--out", str(out)])
    assert done.exit_code == 0, done.output
    assert "Task: no call, where none is needed" in done.output
    assert json.loads(out.read_text())["settings"]["tools_template"] == "chatml"


# ---------------------------------------------------------------------------------------------
# The report


def test_report_shows_calls_readably_and_splits_the_pass_rate():
    assert format_call(call("get_weather", city="Oslo", unit="celsius")) == 'get_weather({"city": "Oslo", "unit": "celsius"})'
    assert format_call({"type": "function", "function": {"name": "f", "arguments": '{"a": 1}'}}) == 'f({"a": 1})'

    def out(passed, calls, expects, problem=None):
        return {"text": "…", "passed": passed, "checks": {"tool_call": passed}, "calls": calls, "expects_call": expects,
                **({"call_problem": problem} if problem else {})}  # fmt: skip

    result = {"models": ["m"], "metrics": [], "sets": [{"name": "task", "title": "Task", "metric_names": ["tool_call"], "examples": [
        {"id": "a", "prompt": "Weather in Oslo?", "reference": None, "reference_calls": OSLO, "outputs": {"m": out(True, OSLO, True)}},
        {"id": "b", "prompt": "Time in <Rome>?", "reference": None, "reference_calls": [call("get_time", city="<Rome>")],
         "outputs": {"m": out(False, [], True, "call 1 is not valid JSON: Expecting value")}},
        {"id": "c", "prompt": "Capital of France?", "reference": "Paris.", "reference_calls": None,
         "outputs": {"m": out(False, [call("get_weather", city="Paris")], False)}},
    ]}]}  # fmt: skip
    rates = dict(pass_rates(result["sets"][0], ["m"]))
    assert rates["tool_call"]["m"] == (1, 3)
    assert rates["tool_call, where a call is needed"]["m"] == (1, 2) and rates["tool_call, where none is needed"]["m"] == (0, 1)
    page = render_html(result)
    assert 'get_time({&quot;city&quot;: &quot;&lt;Rome&gt;&quot;})' in page  # escaped like every model text
    assert "Paris.\nno call" in page and "unreadable call: call 1 is not valid JSON" in page
    markdown = render_markdown(result)
    assert '✓ get_weather({"city": "Oslo"})' in markdown and "✗ unreadable call: call 1" in markdown
    assert "tool_call, where none is needed | 0.0% (0/1)" in markdown
