"""JSON replies (docs/SERVING.md B.13) as the official SDKs ask for them:
OpenAI chat `response_format` (json_schema, json_object) through
`chat.completions.parse`, Responses `text.format` through `responses.parse`,
Anthropic `output_config.format` through `messages.parse`. The demo model has
random weights, so whatever the constraint lets through is what it would
write; the schemas below are finite (enums, booleans, bounded arrays and
numbers) so that every reply ends, and each must parse into the client's
pydantic model.
"""
import json
import re
from typing import List, Literal

import pydantic
import pytest

from test_server import BASH_TOOL, NO_THINK, T0, Server, demo_model, user


class Pick(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid")
    color: Literal["red", "green", "blue"]
    ok: bool
    count: int
    tags: List[Literal["a", "b"]] = pydantic.Field(max_length=3)


PICK_SCHEMA = {"type": "object",
               "properties": {"color": {"enum": ["red", "green", "blue"]}, "ok": {"type": "boolean"},
                              "count": {"type": "integer"},
                              "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 3}},
               "required": ["color", "ok", "count", "tags"], "additionalProperties": False}
CHAT_FORMAT = {"type": "json_schema", "json_schema": {"name": "pick", "schema": PICK_SCHEMA, "strict": True}}


@pytest.mark.parametrize("seed", [None, 1, 2, 3])
def test_chat_parse_gives_the_pydantic_model(seed):
    """chat.completions.parse sends the model's strict schema; every reply,
    greedy or sampled, parses into it and ends with finish_reason stop."""
    with Server() as s:
        c = s.openai()
        kw = {"temperature": 0} if seed is None else {"temperature": 1.0, "seed": seed}
        r = c.chat.completions.parse(model="m", messages=user("Pick a color"), response_format=Pick,
                                     max_tokens=400, extra_body=NO_THINK, **kw)
        ch = r.choices[0]
        assert ch.finish_reason == "stop", ch
        assert isinstance(ch.message.parsed, Pick), ch.message.content
        assert ch.message.parsed == Pick.model_validate_json(ch.message.content)
        assert not ch.message.tool_calls


def test_chat_stream_is_the_plain_reply_and_logprobs_work():
    with Server() as s:
        c = s.openai()
        kw = dict(model="m", messages=user("Pick"), response_format=CHAT_FORMAT, max_tokens=400, temperature=0,
                  extra_body=NO_THINK)
        plain = c.chat.completions.create(**kw)
        text = "".join(ch.choices[0].delta.content or "" for ch in c.chat.completions.create(stream=True, **kw)
                       if ch.choices)
        assert text == plain.choices[0].message.content
        Pick.model_validate_json(text)
        # logprobs take the logits path of the constraint: the same greedy reply
        lp = c.chat.completions.create(logprobs=True, top_logprobs=2, **kw)
        assert lp.choices[0].message.content == text
        assert len(lp.choices[0].logprobs.content) == lp.usage.completion_tokens


def test_thinking_comes_first_then_the_json():
    """In thinking mode the reasoning is free and the constraint starts after
    it (a thinking budget closes the demo model's endless reasoning)."""
    with Server() as s:
        r = s.openai().chat.completions.create(
            model="m", messages=user("Pick"), response_format=CHAT_FORMAT, max_tokens=400, temperature=0,
            extra_body={"thinking": {"type": "enabled", "budget_tokens": 12}})
        m = r.choices[0].message
        assert r.choices[0].finish_reason == "stop"
        assert m.model_extra.get("reasoning_content"), m
        Pick.model_validate_json(m.content)


def test_responses_and_anthropic_parse():
    with Server() as s:
        r = s.openai().responses.parse(model="m", input="Pick a color", text_format=Pick, max_output_tokens=400,
                                       temperature=0, reasoning={"effort": "none"})
        assert r.status == "completed"
        assert isinstance(r.output_parsed, Pick), r.output_text
        assert r.text.format.type == "json_schema"  # the format is echoed
        m = s.anthropic().messages.parse(model="m", max_tokens=400, output_format=Pick, extra_body=T0,
                                         messages=user("Pick a color"), thinking={"type": "disabled"})
        assert m.stop_reason == "end_turn"
        assert isinstance(m.parsed_output, Pick), m.content
        # the beta's top-level output_format is read too
        st, _, body = s.raw("POST", "/v1/messages", {
            "model": "m", "max_tokens": 400, "temperature": 0, "messages": user("Pick"),
            "thinking": {"type": "disabled"}, "output_format": {"type": "json_schema", "schema": PICK_SCHEMA}})
        assert st == 200, body
        Pick.model_validate_json(json.loads(body)["content"][0]["text"])


def test_ref_in_uri_fragment_form_resolves():
    """A $ref is a JSON pointer in URI fragment form (RFC 6901 section 6): "#/$defs/a%20b" names the member "a b"
    and "#/$defs/c~1d" the member "c/d" (the first was a 400 "does not resolve"); %00 names nothing."""
    schema = {"type": "object", "$defs": {"a b": {"type": "integer"}, "c/d": {"enum": ["x"]}},
              "properties": {"n": {"$ref": "#/$defs/a%20b"}, "m": {"$ref": "#/$defs/c~1d"}},
              "required": ["n", "m"], "additionalProperties": False}
    fmt = {"type": "json_schema", "json_schema": {"name": "r", "schema": schema}}
    with Server() as s:
        r = s.openai().chat.completions.create(model="m", messages=user("hi"), response_format=fmt, max_tokens=300,
                                               temperature=0, extra_body=NO_THINK)
        assert r.choices[0].finish_reason == "stop", r.choices[0].message.content
        v = json.loads(r.choices[0].message.content)
        assert isinstance(v["n"], int) and v["m"] == "x", v
        bad = dict(schema, properties={"n": {"$ref": "#/$defs/a%00b"}}, required=["n"])
        st, _, data = s.raw("POST", "/v1/chat/completions", json.dumps(
            {"model": "m", "messages": user("hi"), "max_tokens": 4, "think": False,
             "response_format": {"type": "json_schema", "json_schema": {"name": "r", "schema": bad}}}))
        assert st == 400 and b"does not resolve" in data, data


def test_json_object_mode_and_the_prompt_line(tmp_path):
    """json_object: an object (the reply may run to max_tokens: nothing bounds
    an object's size); the system block ends with a line saying what the reply
    must be (with the schema for json_schema)."""
    trace = tmp_path / "t.txt"
    with Server("--trace", trace) as s:
        c = s.openai()
        for seed in (1, 2, 3):
            r = c.chat.completions.create(model="m", messages=user("hi"), response_format={"type": "json_object"},
                                          max_tokens=200, temperature=1.0, seed=seed, extra_body=NO_THINK)
            text = r.choices[0].message.content
            assert text.lstrip(" \t\r\n").startswith("{"), text
            if r.choices[0].finish_reason == "stop":
                assert isinstance(json.loads(text), dict), text
        c.chat.completions.create(model="m", messages=[{"role": "system", "content": "Be brief."}] + user("x"),
                                  response_format=CHAT_FORMAT, max_tokens=1, extra_body=NO_THINK)
    t = trace.read_text(errors="replace")
    assert "Reply with one JSON object and nothing else.<｜User｜>hi" in t, t[-3000:]
    assert 'Be brief.\n\nReply with one JSON value and nothing else ("pick"). It must follow this JSON schema:\n{' in t
    assert '"maxItems":3' in t


def test_tools_with_a_json_format():
    """With tools and tool_choice auto the reply is a JSON value or opens a
    tool-call block; with tool_choice required the forced call wins."""
    with Server() as s:
        c = s.openai()
        for seed in (1, 2):
            r = c.chat.completions.create(model="m", messages=user("ls"), tools=[BASH_TOOL],
                                          response_format=CHAT_FORMAT, max_tokens=400, temperature=1.0, seed=seed,
                                          extra_body=NO_THINK)
            ch = r.choices[0]
            if ch.finish_reason == "tool_calls":
                assert ch.message.tool_calls
            elif "tool_calls>" in (ch.message.content or ""):
                pass  # a block opened (the rest is the model's: this one's random text is no call)
            else:
                assert ch.finish_reason == "stop", ch
                Pick.model_validate_json(ch.message.content)
        r = c.chat.completions.create(model="m", messages=user("ls"), tools=[BASH_TOOL], tool_choice="required",
                                      response_format=CHAT_FORMAT, max_tokens=200, temperature=0,
                                      extra_body=NO_THINK)
        # (the call is the forced one; the random model never closes its string value: cut by the limit)
        assert r.choices[0].finish_reason == "length" and r.choices[0].message.tool_calls[0].function.name == "bash", r
        assert not r.choices[0].message.content


@pytest.mark.parametrize("path,body,word", [
    ("/v1/chat/completions", {"response_format": {"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"type": "strnig"}}}}, b"unknown type 'strnig'"),
    ("/v1/chat/completions", {"response_format": {"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"$ref": "#/$defs/nope"}}}}, b"does not resolve"),
    ("/v1/chat/completions", {"response_format": {"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"type": "object", "properties": {}, "required": ["a"]}}}},
     b"required property 'a' is not in properties"),
    ("/v1/chat/completions", {"response_format": {"type": "json_schema"}}, b"json_schema must be an object"),
    ("/v1/chat/completions", {"response_format": {"type": "xml"}}, b"'xml' is not supported"),
    ("/v1/chat/completions", {"response_format": "json"}, b"must be an object with a type"),
    ("/v1/completions", {"response_format": {"type": "json_object"}}, b"response_format"),
    ("/v1/responses", {"text": {"format": {"type": "json_schema", "name": "x", "schema": {"enum": []}}}},
     b"enum must be a non-empty array"),
    ("/v1/messages", {"output_config": {"format": {"type": "json_schema", "schema": {"allOf": [{}, {}]}}}},
     b"allOf is supported with one schema only"),
])
def test_schemas_that_cannot_be_served_are_400s(path, body, word):
    base = {"/v1/chat/completions": {"model": "m", "max_tokens": 2, "messages": user("hi")},
            "/v1/completions": {"model": "m", "max_tokens": 2, "prompt": "hi"},
            "/v1/responses": {"model": "m", "max_output_tokens": 2, "input": "hi"},
            "/v1/messages": {"model": "m", "max_tokens": 2, "messages": user("hi")}}
    with Server() as s:
        st, _, out = s.raw("POST", path, {**base[path], **body})
        assert st == 400 and word in out, (st, out)
        field = b"output_config.format" if path == "/v1/messages" else \
            b"text.format" if path == "/v1/responses" else b"response_format"
        assert field in out, out


def test_mtp_runs_through_the_reasoning_and_changes_nothing(tmp_path):
    """With --mtp the reasoning of a JSON request is drafted as any other
    (MTP was off for the whole request); a cycle that runs past the end of
    the reasoning is rewound where the constraint refuses a token. A random
    MTP block (its drafts rejected) gives the plain reply exactly, seeded
    sampling included (the thinking budget closing the reasoning dropped a
    drawn token and shifted the generator); forced acceptance (the output is
    then the drafts', not the model's) crosses the boundary: rewound, and the
    reply is still the schema's."""
    from test_mtp import make_mtp
    mtp = make_mtp(demo_model(), tmp_path / "mtp.gguf", seed=3, arch="deepseek4_mtp_support")

    def replies(*args):
        with Server(*args) as s:
            out = []
            for budget in (8, 12, 20):
                r = s.openai().chat.completions.create(
                    model="m", messages=user("Pick"), response_format=CHAT_FORMAT, max_tokens=300, temperature=0,
                    seed=5, extra_body={"thinking": {"type": "enabled", "budget_tokens": budget}})
                m = r.choices[0].message
                out.append((r.choices[0].finish_reason, m.model_extra.get("reasoning_content"), m.content))
            return out, s.log_text()

    plain, _ = replies()
    drafted, log = replies("--mtp", mtp, "--mtp-gate", "0")
    assert re.search(r"mtp \S+: \d+ cycles, .* drafts [1-9]", log), log
    assert drafted == plain
    forced, log = replies("--mtp", mtp, "--mtp-gate", "0", "--debug-mtp-accept", "1")
    assert "drafted tokens past the reasoning rewound (JSON format)" in log, log
    for finish, reasoning, content in forced:
        assert finish == "stop" and reasoning
        Pick.model_validate_json(content)


def test_prefill_and_a_think_tag_written_as_text():
    """An assistant prefill is the start of the reply: it must start a value
    of the format (400 otherwise) and the reply continues it (the format's
    system line had been appended after it, so the prefill was closed and a
    new value began: prefill + reply was no JSON). A "</think>" written as
    text whose token carries more bytes: those bytes are content the
    constraint must see (they went out unchecked: '{true')."""
    with Server() as s:
        c = s.openai()
        for seed in (1, 2, 3):
            r = c.chat.completions.create(
                model="m", messages=user("Pick") + [{"role": "assistant", "content": '{"color": "re'}],
                response_format=CHAT_FORMAT, max_tokens=300, temperature=1.0, seed=seed, extra_body=NO_THINK)
            assert r.choices[0].finish_reason == "stop"
            Pick.model_validate_json('{"color": "re' + r.choices[0].message.content)
        st, _, body = s.raw("POST", "/v1/chat/completions", {
            "model": "m", "max_tokens": 5, "response_format": CHAT_FORMAT,
            "messages": user("Pick") + [{"role": "assistant", "content": "Sure: {"}]})
        assert st == 400 and b"not the start of a JSON value" in body, body
        m = s.anthropic().messages.create(
            model="m", max_tokens=300, messages=user("Pick") + [{"role": "assistant", "content": '{"ok": '}],
            thinking={"type": "disabled"}, extra_body={"output_config": {"format": {"type": "json_schema",
                                                                                   "schema": PICK_SCHEMA}}, **T0})
        Pick.model_validate_json('{"ok": ' + m.content[0].text)
        bias = {"1718": 100, "37947": 100, "48902": 100}  # "</", "think", '>"' in the demo vocabulary
        stops = 0
        for seed in range(1, 7):  # the reasoning samples these three tokens until they spell the tag
            r = c.chat.completions.create(
                model="m", messages=user("yes?"), max_tokens=400, temperature=1.0, seed=seed, logit_bias=bias,
                response_format={"type": "json_schema", "json_schema": {"name": "b", "schema": {"type": "boolean"}}},
                extra_body={"thinking": {"type": "enabled"}})
            if r.choices[0].finish_reason == "stop":
                stops += 1
                assert json.loads(r.choices[0].message.content) in (True, False), r.choices[0].message.content
        assert stops >= 2, stops
