"""ds4-server as real clients see it (issue 12): each test drives the server
with the official openai / anthropic SDKs (strict response validation) and
checks one behaviour those clients rely on. The demo model has random
weights: its text is meaningless, which makes it good at the edge cases
(thinking turns cut by max_tokens, control tokens in the output).

Items (issue 12): 1 stream == non-stream for every API; 2 Anthropic
stop_sequences; 3 Anthropic usage; 4 Responses tool_choice and the echoed
members; 5 OpenAI required members, logprobs, error objects, n; 6 Anthropic
errors, ids, count_tokens; 7 control tokens never in content; 8 the
--default-thinking option.
"""
import http.client
import json
import re

import anthropic
import pytest

from test_server import BASH_CALL_THINK, BASH_TOOL, NO_THINK, Server, dsml_call, prompt_tokens, user

ANTH_TOOL = {"name": "Bash", "description": "Run a command",
             "input_schema": {"type": "object", "properties": {"command": {"type": "string"}},
                              "required": ["command"]}}
RESP_TOOL = {"type": "function", "name": "bash", "description": "Run a shell command",
             "parameters": {"type": "object", "properties": {"command": {"type": "string"}},
                            "required": ["command"]}}
SEED = {"seed": 7}


def sse(data):
    """(event name or None, parsed JSON) of every data line of an SSE body."""
    out, name = [], None
    for line in data.decode().split("\n"):
        if line.startswith("event: "):
            name = line[7:]
        elif line.startswith("data: "):
            out.append((name, None if line[6:] == "[DONE]" else json.loads(line[6:])))
            name = None
    return out


def raw_json(s, path, body):
    st, _, data = s.raw("POST", path, body)
    assert st == 200, data
    return json.loads(data)


# ---- 1. one reply, streamed or not ------------------------------------------------

def chat_view(r):
    m = r.choices[0].message
    calls = [(c.function.name, json.loads(c.function.arguments)) for c in m.tool_calls or []]
    return dict(reasoning=(m.model_extra or {}).get("reasoning_content") or "",
                content=m.content or "", calls=calls, finish=r.choices[0].finish_reason,
                usage=(r.usage.prompt_tokens, r.usage.completion_tokens))


def chat_stream_view(chunks):
    reasoning = content = ""
    calls, finish, usage = {}, None, None
    for k in chunks:
        if k.usage:
            usage = (k.usage.prompt_tokens, k.usage.completion_tokens)
        if not k.choices:
            continue
        d = k.choices[0].delta
        reasoning += (d.model_extra or {}).get("reasoning_content") or ""
        content += d.content or ""
        for tc in d.tool_calls or []:
            c = calls.setdefault(tc.index, ["", ""])
            c[0] += tc.function.name or "" if tc.function else ""
            c[1] += tc.function.arguments or "" if tc.function else ""
        finish = k.choices[0].finish_reason or finish
    return dict(reasoning=reasoning, content=content,
                calls=[(n, json.loads(a)) for n, a in (calls[i] for i in sorted(calls))],
                finish=finish, usage=usage)


@pytest.mark.parametrize("case", ["thinking_cut", "forced_call"])
def test_chat_stream_and_plain_are_the_same_reply(case):
    kw = dict(model="m", messages=user("List the files"), max_tokens=24, seed=7)
    if case == "forced_call":
        kw.update(tools=[BASH_TOOL], tool_choice="required", max_tokens=400)
    # forced: --debug-reply plays a model that reasons, then calls (the demo model never closes a value)
    with Server(*(("--debug-reply", BASH_CALL_THINK) if case == "forced_call" else ())) as s:
        c = s.openai()
        a = chat_view(c.chat.completions.create(**kw))
        b = chat_stream_view(c.chat.completions.create(
            stream=True, stream_options={"include_usage": True}, **kw))
    if case == "thinking_cut":
        # random weights: the reasoning never closes, the cut is inside <think>
        assert a["finish"] == "length" and a["reasoning"] and a["content"] == ""
    else:
        assert a["finish"] == "tool_calls" and a["calls"] == [("bash", {"command": "ls -la /tmp && echo done"})]
        assert a["reasoning"] == "Listing the files."
    assert a == b


@pytest.mark.parametrize("max_tokens", [3, 8, 15, 25, 40])
def test_a_tool_call_cut_by_max_tokens_is_the_same_streamed_or_not(max_tokens):
    """A forced call cut inside its block gives no call (TEXT C.6) in either form: the stream holds a block's
    tool-call deltas until the block closes, so it never announces a call the reply then lacks (found by an
    outside client pass: the stream had a tool call, the plain reply only text)."""
    tools = [{"type": "function", "function": {
        "name": "get_weather", "parameters": {"type": "object", "properties": {
            "city": {"type": "string"}, "n": {"type": "integer"},
            "tags": {"type": "array", "items": {"type": "string"}}}, "required": ["city"]}}}]
    kw = dict(model="m", messages=user("weather?"), max_tokens=max_tokens, temperature=0, tools=tools,
              tool_choice="required", extra_body={"think": False})
    akw = dict(model="m", messages=user("weather?"), max_tokens=max_tokens,
               tools=[{"name": "get_weather", "input_schema": tools[0]["function"]["parameters"]}],
               tool_choice={"type": "any"}, extra_body={"think": False, "temperature": 0})
    with Server() as s:
        c = s.openai()
        a = chat_view(c.chat.completions.create(**kw))
        b = chat_stream_view(c.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
        ac = s.anthropic()
        x = anthropic_view(ac.messages.create(**akw))
        with ac.messages.stream(**akw) as st:
            y = anthropic_view(st.get_final_message())
    assert a == b, (a, b)
    assert x == y, (x, y)
    # a call comes whole (tool_calls) or closed short by the limit (length: forced.c); no finish claims a call
    # the reply lacks
    assert (a["finish"] in ("tool_calls", "length")) if a["calls"] else a["finish"] != "tool_calls", a
    tool_use = any(k == "tool_use" for k, _ in x["blocks"])
    assert (x["stop"] in ("tool_use", "max_tokens")) if tool_use else x["stop"] != "tool_use", x


def anthropic_view(m):
    blocks = [(b.type, getattr(b, "thinking", None) or getattr(b, "text", None) or
               (b.name, b.input) if b.type == "tool_use" else
               getattr(b, "thinking", None) or getattr(b, "text", None)) for b in m.content]
    return dict(blocks=blocks, stop=m.stop_reason, seq=m.stop_sequence,
                usage=(prompt_tokens(m.usage), m.usage.output_tokens))


@pytest.mark.parametrize("case", ["thinking_cut", "forced_call"])
def test_anthropic_stream_and_plain_are_the_same_reply(case):
    kw = dict(model="m", messages=user("List files"), max_tokens=24, extra_body=SEED)
    if case == "forced_call":
        kw.update(tools=[ANTH_TOOL], tool_choice={"type": "any"}, max_tokens=400)
    call = "Listing the files.</think>" + dsml_call("Bash", command="ls -la")
    with Server(*(("--debug-reply", call) if case == "forced_call" else ())) as s:
        c = s.anthropic()
        a = anthropic_view(c.messages.create(**kw))
        with c.messages.stream(**kw) as st:
            b = anthropic_view(st.get_final_message())
    if case == "thinking_cut":
        # the cut reasoning is a thinking block in both forms, never text
        assert a["stop"] == "max_tokens"
        assert [k for k, _ in a["blocks"]] == ["thinking", "text"] and a["blocks"][1][1] == ""
    else:
        assert a["stop"] == "tool_use" and a["blocks"][-1] == ("tool_use", ("Bash", {"command": "ls -la"}))
    assert a == b


def responses_view(r):
    items = []
    for it in r.output:
        if it.type == "reasoning":
            items.append(("reasoning", it.status, "".join(p.text for p in it.summary)))
        elif it.type == "message":
            items.append(("message", it.status, "".join(p.text for p in it.content)))
        else:
            items.append((it.type, it.name, json.loads(it.arguments)))
    return dict(status=r.status, items=items,
                usage=(r.usage.input_tokens, r.usage.output_tokens))


@pytest.mark.parametrize("case", ["thinking_cut", "forced_call"])
def test_responses_stream_and_plain_are_the_same_reply(case):
    kw = dict(model="m", input="List the files", max_output_tokens=24,
              reasoning={"effort": "high", "summary": "auto"}, extra_body=SEED)
    if case == "forced_call":
        kw.update(tools=[RESP_TOOL], tool_choice="required", max_output_tokens=400)
    with Server(*(("--debug-reply", BASH_CALL_THINK) if case == "forced_call" else ())) as s:
        c = s.openai()
        a = responses_view(c.responses.create(**kw))
        events = list(c.responses.create(stream=True, **kw))
        b = responses_view(events[-1].response)
        # the deltas add up to the final items
        text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
        summ = "".join(e.delta for e in events if e.type == "response.reasoning_summary_text.delta")
    if case == "thinking_cut":
        assert a["status"] == "incomplete" and a["items"][0][:2] == ("reasoning", "incomplete")
        assert all(k != "message" for k, *_ in a["items"])
    else:
        assert a["status"] == "completed" and a["items"][-1] == ("function_call", "bash",
                                                                 {"command": "ls -la /tmp && echo done"})
    assert a == b
    assert summ == "".join(t for k, _, t in b["items"] if k == "reasoning")
    assert text == "".join(t for k, _, t in b["items"] if k == "message")


def test_responses_stream_closes_the_reasoning_item_before_the_message():
    """Output items stream one after another: the reasoning item's done events (text, part, item: completed) come
    before the message item is added; it stayed open until the end of the reply, so a client tracking the current
    item showed the reasoning as running while the answer streamed. Its done text is the streamed deltas'."""
    with Server("--debug-reply", "let me think</think>Hello there") as s:
        events = list(s.openai().responses.create(model="m", input="hi", max_output_tokens=100, stream=True,
                                                  reasoning={"effort": "high", "summary": "auto"}))
    seq = [(e.type, getattr(e, "output_index", None)) for e in events]
    done0 = seq.index(("response.output_item.done", 0))
    added1 = seq.index(("response.output_item.added", 1))
    assert done0 < added1, seq
    assert seq.index(("response.reasoning_summary_text.done", 0)) < done0
    item = events[done0].item
    assert item.type == "reasoning" and item.status == "completed" and item.summary[0].text == "let me think"
    summ = "".join(e.delta for e in events if e.type == "response.reasoning_summary_text.delta")
    assert summ == "let me think" and seq.count(("response.output_item.done", 0)) == 1
    final = events[-1].response
    assert [o.type for o in final.output] == ["reasoning", "message"] and final.output[1].content[0].text == "Hello there"


def test_completions_stream_and_plain_are_the_same_reply():
    import openai
    kw = dict(model="m", prompt="Once upon a time", max_tokens=16, seed=7, logprobs=2)
    with Server() as s:
        a = s.openai().completions.create(**kw)
        loose = openai.OpenAI(base_url=s.url + "/v1", api_key="none", max_retries=0)
        parts = list(loose.completions.create(stream=True, **kw))
    assert "".join(p.choices[0].text for p in parts) == a.choices[0].text
    assert parts[-1].choices[0].finish_reason == a.choices[0].finish_reason
    streamed = [t for p in parts if p.choices[0].logprobs for t in p.choices[0].logprobs.tokens]
    assert streamed == a.choices[0].logprobs.tokens


def test_completions_think_by_default_and_return_the_raw_text():
    """Legacy completions think by default (TEXT B.6): the text is the raw reply, reasoning, </think> and answer
    (the </think> was dropped), streamed or not; the reasoning tokens are counted (they were 0); and the client's
    temperature is ignored while thinking (TEXT D.2: it was applied), so seeds matter; with thinking off it holds."""
    import openai
    with Server("--debug-reply", "my reasoning</think>the answer") as s:
        c = s.openai()
        a = c.completions.create(model="m", prompt="hi there", max_tokens=40)
        assert a.choices[0].text == "my reasoning</think>the answer", a.choices[0].text
        assert a.usage.completion_tokens_details.reasoning_tokens >= 3, a.usage
        loose = openai.OpenAI(base_url=s.url + "/v1", api_key="none", max_retries=0)
        parts = list(loose.completions.create(model="m", prompt="hi there", max_tokens=40, stream=True))
        assert "".join(p.choices[0].text for p in parts) == a.choices[0].text
    with Server() as s:
        c = s.openai()
        kw = dict(model="m", prompt="Once upon a time", max_tokens=16, temperature=0)
        think = {c.completions.create(seed=k, **kw).choices[0].text for k in (1, 2, 3)}
        plain = {c.completions.create(seed=k, extra_body={"thinking": False}, **kw).choices[0].text for k in (1, 2, 3)}
        assert len(think) > 1 and len(plain) == 1, (think, plain)


# ---- 2. and 3. Anthropic stop sequences and usage -----------------------------------

def test_anthropic_stop_sequence_is_reported():
    kw = dict(model="m", max_tokens=16, messages=user("Count with me"),
              thinking={"type": "disabled"}, extra_body={"temperature": 0})
    with Server() as s:
        c = s.anthropic()
        full = c.messages.create(**kw).content[0].text
        assert len(full) >= 6, full
        stop = full[3:6]
        m = c.messages.create(stop_sequences=["zzqq-never", stop], **kw)
        assert m.stop_reason == "stop_sequence" and m.stop_sequence == stop
        assert m.content[0].text == full[:full.index(stop)]
        with c.messages.stream(stop_sequences=[stop], **kw) as st:
            deltas = [e for e in st if e.type == "message_delta"]
            f = st.get_final_message()
        assert deltas[-1].delta.stop_reason == "stop_sequence"
        assert deltas[-1].delta.stop_sequence == stop
        assert f.stop_reason == "stop_sequence" and f.stop_sequence == stop
        n = c.messages.create(**kw)
        assert n.stop_sequence is None and n.stop_reason in ("end_turn", "max_tokens")


def test_anthropic_usage_input_tokens_in_start_and_final_delta():
    kw = dict(model="m", max_tokens=4, thinking={"type": "disabled"}, extra_body={"temperature": 0})
    system = "You are a careful assistant. " * 20
    with Server() as s:
        c = s.anthropic()
        # no cache_control: every new prompt token is input
        with c.messages.stream(messages=user("Hi"), system=system, **kw) as st:
            evs = list(st)
        start = [e for e in evs if e.type == "message_start"][0].message.usage
        delta = [e for e in evs if e.type == "message_delta"][-1].usage
        assert start.input_tokens > 40 and start.cache_creation_input_tokens == 0
        assert start.cache_read_input_tokens == 0
        assert delta.input_tokens == start.input_tokens and delta.output_tokens > 0
        assert delta.cache_read_input_tokens == 0 and delta.cache_creation_input_tokens == 0
        total = start.input_tokens
        # same prefix again: reads from the KV cache count as reads
        m = c.messages.create(messages=user("Hi"), system=system, **kw)
        assert prompt_tokens(m.usage) == total and m.usage.cache_read_input_tokens > 40
        assert m.usage.input_tokens == total - m.usage.cache_read_input_tokens
        # a client that asks for caching: the new tokens are cache writes
        cached_sys = [{"type": "text", "text": "Other rules. " * 20,
                       "cache_control": {"type": "ephemeral"}}]
        w = c.messages.create(messages=user("Hi"), system=cached_sys, **kw)
        assert w.usage.cache_creation_input_tokens > 40 and w.usage.input_tokens == 0


# ---- 4. Responses: forced tools, echoed members, event lines -------------------------

def test_responses_tool_choice_required_and_named_and_echo():
    import openai
    with Server() as s:
        c = s.openai()
        for tc in ("required", {"type": "function", "name": "bash"}):
            r = c.responses.create(model="m", input="List the files", tools=[RESP_TOOL],
                                   tool_choice=tc, max_output_tokens=120, temperature=0,
                                   reasoning={"effort": "none"}, instructions="Be brief.",
                                   metadata={"run": "42"}, top_p=0.5)
            calls = [it for it in r.output if it.type == "function_call"]
            assert len(calls) == 1 and calls[0].name == "bash", r.output
            assert isinstance(json.loads(calls[0].arguments)["command"], str)
            raw = r.to_dict(mode="json")
            assert raw["tools"][0]["name"] == "bash" and raw["tool_choice"] == tc
            assert raw["instructions"] == "Be brief." and raw["metadata"] == {"run": "42"}
            assert raw["temperature"] == 0 and raw["top_p"] == 0.5
            assert "error" in r.model_fields_set and r.error is None
        with pytest.raises(openai.BadRequestError) as ei:
            c.responses.create(model="m", input="x", tools=[RESP_TOOL],
                               tool_choice={"type": "function", "name": "rm"})
        assert ei.value.response.json()["error"]["message"] == \
            "tool_choice names function 'rm', which is not in tools"
        # defaults are echoed when the request says nothing
        d = c.responses.create(model="m", input="x", max_output_tokens=1,
                               reasoning={"effort": "none"})
        assert d.tools == [] and d.tool_choice == "auto" and d.instructions is None
        assert d.temperature == 1.0 and d.top_p == 1.0 and d.metadata == {}
        assert d.to_dict(mode="json")["text"] == {"format": {"type": "text"}}
        # text.verbosity (Codex CLI sends it) is echoed as given
        v = c.responses.create(model="m", input="x", max_output_tokens=1, reasoning={"effort": "none"},
                               text={"verbosity": "low"})
        assert v.to_dict(mode="json")["text"] == {"format": {"type": "text"}, "verbosity": "low"}, v.text
        # stream events carry "event:" lines named as their type
        st, hdr, data = s.raw("POST", "/v1/responses", {"model": "m", "input": "x", "stream": True,
                                                         "max_output_tokens": 3,
                                                         "reasoning": {"effort": "none"}})
        evs = sse(data)
        assert evs and all(name == body["type"] for name, body in evs)
        assert evs[0][1]["response"]["error"] is None


# ---- 5. OpenAI required members, logprobs, errors, n ----------------------------------

def test_openai_required_members_and_logprobs():
    with Server() as s:
        c = s.openai()
        kw = dict(model="m", messages=user("Hello"), max_tokens=8, temperature=0,
                  extra_body={"think": False})
        body = raw_json(s, "/v1/chat/completions", dict(kw, think=False, extra_body=None))
        ch = body["choices"][0]
        assert "logprobs" in ch and ch["logprobs"] is None
        assert "refusal" in ch["message"] and ch["message"]["refusal"] is None
        r = c.chat.completions.create(logprobs=True, top_logprobs=3, **kw)
        lp = r.choices[0].logprobs.content
        assert "".join(t.token for t in lp) == r.choices[0].message.content
        assert len(lp) == r.usage.completion_tokens
        for t in lp:
            assert t.logprob <= 0 and len(t.top_logprobs) == 3
            assert t.top_logprobs[0].logprob >= t.top_logprobs[-1].logprob
            assert t.top_logprobs[0].token == t.token  # greedy: the top token
            assert bytes(t.bytes).decode("utf-8", "replace") == t.token or "\ufffd" in t.token
        chunks = list(c.chat.completions.create(logprobs=True, top_logprobs=3, stream=True, **kw))
        slp = [t for k in chunks if k.choices and k.choices[0].logprobs
               for t in k.choices[0].logprobs.content]
        assert [(t.token, round(t.logprob, 4)) for t in slp] == \
            [(t.token, round(t.logprob, 4)) for t in lp]
        # completions: logprobs N
        cr = c.completions.create(model="m", prompt="Once upon", max_tokens=6, temperature=0,
                                  logprobs=2, extra_body={"think": False})
        clp = cr.choices[0].logprobs
        assert "".join(clp.tokens) == cr.choices[0].text
        assert len(clp.token_logprobs) == len(clp.tokens) == len(clp.top_logprobs)
        assert all(len(t) <= 2 for t in clp.top_logprobs)
        assert clp.text_offset == sorted(clp.text_offset) and clp.text_offset[0] == 0
        # offsets count characters (the random demo model emits CJK tokens): each token sits at its offset, also
        # after a token that ends in a lone lead byte (one U+FFFD in the text: the offsets after it were 1 short)
        invalid = 0
        for prompt in ("hello", "Once upon", "Tell me a story"):
            cr = c.completions.create(model="m", prompt=prompt, max_tokens=120, temperature=0, logprobs=1,
                                      extra_body={"think": False})
            clp, text = cr.choices[0].logprobs, cr.choices[0].text
            assert "".join(clp.tokens) == text and len(clp.text_offset) == len(clp.tokens)
            for tok, off in zip(clp.tokens, clp.text_offset):
                assert text[off:off + len(tok)] == tok, (prompt, tok, off, text)
            invalid += "\ufffd" in text
        assert invalid, "no reply with invalid UTF-8: the case is not covered"


def test_openai_error_objects_and_n():
    import openai
    with Server() as s:
        c = s.openai()
        with pytest.raises(openai.BadRequestError) as ei:
            c.chat.completions.create(model="m", messages=user("x"), n=2, max_tokens=1)
        err = ei.value.response.json()["error"]
        assert err["param"] == "n" and err["code"] == "unsupported_value"
        assert ei.value.param == "n"
        with pytest.raises(openai.BadRequestError) as ei:
            c.completions.create(model="m", prompt="x", n=3, max_tokens=1)
        assert ei.value.response.json()["error"]["param"] == "n"
        st, _, data = s.raw("POST", "/v1/chat/completions", {"model": "m"})
        assert json.loads(data)["error"] == {"message": "missing messages",
                                             "type": "invalid_request_error",
                                             "param": "messages", "code": None}
        st, _, data = s.raw("POST", "/v1/nowhere", {})
        assert st == 404 and json.loads(data)["error"]["code"] == "unknown_url"
        r = c.chat.completions.create(model="m", messages=user("x"), n=1, max_tokens=1,
                                      extra_body={"think": False})
        assert len(r.choices) == 1


# ---- 6. Anthropic errors, ids, count_tokens -----------------------------------------

def test_anthropic_error_shapes_ids_and_count_tokens():
    import anthropic
    with Server("--api-key", "sekrit") as s:
        good = anthropic.Anthropic(base_url=s.url, api_key="sekrit", max_retries=0,
                                   _strict_response_validation=True)
        bad = anthropic.Anthropic(base_url=s.url, api_key="wrong", max_retries=0,
                                  _strict_response_validation=True)
        with pytest.raises(anthropic.AuthenticationError) as ei:
            bad.messages.create(model="m", max_tokens=1, messages=user("x"))
        assert ei.value.body == {"type": "error", "error": {"type": "authentication_error",
                                                            "message": "invalid API key"}}
        st, _, data = s.raw("POST", "/v1/messages/nowhere", {}, headers={"x-api-key": "sekrit"})
        assert st == 404 and json.loads(data)["error"]["type"] == "not_found_error"
        with pytest.raises(anthropic.BadRequestError) as ei:
            good.messages.create(model="m", max_tokens=1, messages="nope")
        assert ei.value.body == {"type": "error", "error": {"type": "invalid_request_error",
                                                            "message": "invalid JSON request"}}
        kw = dict(model="m", messages=user("Count my tokens please"), system="Be brief.",
                  tools=[ANTH_TOOL])
        n = good.messages.count_tokens(**kw)
        m = good.messages.create(max_tokens=2, thinking={"type": "disabled"},
                                 **dict(kw, extra_body={"temperature": 0}))
        n_off = good.messages.count_tokens(thinking={"type": "disabled"}, **kw)
        assert n_off.input_tokens == prompt_tokens(m.usage)
        # thinking on: the prompt ends "<think>" instead of "</think>", one token each
        assert n.input_tokens == n_off.input_tokens
        ids = {m.id} | {good.messages.create(max_tokens=1, **dict(kw, extra_body={"temperature": 0})).id
                        for _ in range(2)}
        assert len(ids) == 3 and all(re.fullmatch(r"msg_[0-9a-f]{24}", i) for i in ids)
    with Server() as s2:  # a restart does not reuse ids (they were a counter from 1)
        again = s2.anthropic().messages.create(max_tokens=1, **dict(kw, extra_body={"temperature": 0}))
        chat = s2.openai().chat.completions.create(model="m", messages=user("x"), max_tokens=1)
        assert again.id not in ids and re.fullmatch(r"chatcmpl-[0-9a-f]{24}", chat.id)


# ---- 7. control tokens never in the text ----------------------------------------------

def test_control_tokens_never_reach_content():
    """The random model samples added tokens ("<｜place▁holder▁no▁N｜>", "<|EOT|>",
    "<｜User｜>") now and then; with this seed it does (the reply has fewer text
    tokens than generated tokens), and none of their text shows."""
    kw = dict(model="m", messages=user("Tell me a story"), max_tokens=150, seed=1,
              extra_body={"think": False, "min_p": 0})
    with Server() as s:
        c = s.openai()
        r = c.chat.completions.create(logprobs=True, **kw)
        text = r.choices[0].message.content
        assert r.usage.completion_tokens > len(r.choices[0].logprobs.content)
        assert "".join(t.token for t in r.choices[0].logprobs.content) == text
        parts = list(c.chat.completions.create(stream=True, **kw))
        streamed = "".join(p.choices[0].delta.content or "" for p in parts if p.choices)
        cr = c.completions.create(model="m", prompt="Tell me a story", max_tokens=150, seed=1,
                                  extra_body={"think": False, "min_p": 0})
    for t in (text, streamed, cr.choices[0].text):
        assert "\uff5c" not in t and "<|" not in t and "think>" not in t, t
    assert streamed == text


# ---- 8. the default thinking mode is a server option ----------------------------------

def test_default_thinking_option_per_api():
    kw = dict(model="m", max_tokens=6, messages=user("Hi"), extra_body={"temperature": 0})
    with Server("--default-thinking", "anthropic=off") as s:
        a = s.anthropic()
        m = a.messages.create(**kw)  # no "thinking": off, as Anthropic's API means
        assert [b.type for b in m.content] == ["text"]
        t = a.messages.create(thinking={"type": "enabled", "budget_tokens": 1024}, **kw)
        assert t.content[0].type == "thinking"
        # the other APIs keep the documented default (on)
        r = s.openai().chat.completions.create(model="m", messages=user("Hi"), max_tokens=6)
        assert (r.choices[0].message.model_extra or {}).get("reasoning_content")
    with Server("--default-thinking", "off") as s:
        r = s.openai().chat.completions.create(model="m", messages=user("Hi"), max_tokens=6,
                                               temperature=0)
        assert not (r.choices[0].message.model_extra or {}).get("reasoning_content")
        assert r.choices[0].message.content
        # a reasoning effort still asks for reasoning
        e = s.openai().chat.completions.create(model="m", messages=user("Hi"), max_tokens=6,
                                               reasoning_effort="high")
        assert (e.choices[0].message.model_extra or {}).get("reasoning_content")
    with pytest.raises(RuntimeError):
        Server("--default-thinking", "bogus", wait=20)


def test_prefill_continues_the_assistant_message_and_roles_are_checked(tmp_path):
    """A conversation that ends with an assistant message (Anthropic's prefill, DeepSeek's prefix completion)
    continues that message: the turn stays open (no end-of-sentence in the prompt) and the reply is content, not
    reasoning. A system-only conversation gets an (empty) user turn and an assistant turn to answer in. Unknown
    roles and tool messages that answer no call are 400s (they were dropped or accepted silently)."""
    trace = tmp_path / "t.txt"
    with Server("--trace", trace) as s:
        c = s.openai()
        r = c.chat.completions.create(model="m", max_tokens=6, temperature=0,
                                      messages=user("hi") + [{"role": "assistant", "content": "Sure, here"}])
        assert r.choices[0].message.content and not (r.choices[0].message.model_extra or {}).get("reasoning_content")
        a = s.anthropic()
        m = a.messages.create(model="m", max_tokens=6, messages=[{"role": "user", "content": "hi"},
                                                                 {"role": "assistant", "content": "{"}])
        assert [b.type for b in m.content] == ["text"], m
        c.chat.completions.create(model="m", max_tokens=2, messages=[{"role": "system", "content": "Be brief."}])
        st, _, body = s.raw("POST", "/v1/chat/completions",
                            {"model": "m", "max_tokens": 2, "messages": [{"role": "wizard", "content": "x"}]})
        assert st == 400 and b"unknown role" in body, body
        st, _, body = s.raw("POST", "/v1/messages",
                            {"model": "m", "max_tokens": 2, "messages": [{"role": "system", "content": "x"}]})
        assert st == 400 and b"role must be" in body, body
        st, _, body = s.raw("POST", "/v1/responses", {"model": "m", "input": [{"role": "wizard", "content": "x"}]})
        assert st == 400 and b"unknown role" in body, body
        st, _, body = s.raw("POST", "/v1/chat/completions",
                            {"model": "m", "max_tokens": 2, "messages": user("x") + [
                                {"role": "tool", "tool_call_id": "call_nope", "content": "y"}]})
        assert st == 400 and b"matches none" in body, body
        # Responses items without the call_id that ties an output to its call (an outside pass: the output was
        # rendered as a result of nothing, the call as one that no output could answer)
        for items in ([{"type": "function_call_output", "output": "y"}],
                      [{"type": "function_call", "name": "f", "arguments": "{}"}]):
            st, _, body = s.raw("POST", "/v1/responses", {"model": "m", "max_output_tokens": 2,
                                                          "input": [{"role": "user", "content": "x"}] + items})
            assert st == 400 and b"call_id" in body, (items, body)
    t = trace.read_text(errors="replace")
    assert "<｜User｜>hi<｜Assistant｜><think></think>Sure, here\n" in t or \
        "<｜User｜>hi<｜Assistant｜></think>Sure, here\n" in t, t[:3000]
    assert "Sure, here<｜end▁of▁sentence｜>" not in t
    assert "Be brief.<｜User｜><｜Assistant｜>" in t, t


def test_unsupported_options_are_refused_and_media_is_named(tmp_path):
    """Options ds4 does not implement are a 400 naming them (JSON formats, logit_bias and the
    penalties are served since: test_server_json.py, test_logit_bias_and_penalties_change_the_reply), their no-op values pass; media parts (images, audio, files) become a line
    telling the model what it cannot see, in every API (they were dropped, so the model answered as if the
    image were not there)."""
    trace = tmp_path / "t.txt"
    bad = [("/v1/chat/completions", {"response_format": {"type": "grammar"}}, b"response_format"),
           ("/v1/chat/completions", {"logit_bias": {"42": 500}}, b"logit_bias"),
           ("/v1/chat/completions", {"presence_penalty": 2.5}, b"presence_penalty"),
           ("/v1/completions", {"response_format": {"type": "json_object"}}, b"response_format"),
           ("/v1/chat/completions", {"tool_choice": "sometimes"}, b"tool_choice"),
           ("/v1/chat/completions", {"tool_choice": "required"}, b"needs tools"),
           ("/v1/completions", {"echo": True}, b"echo"),
           ("/v1/completions", {"suffix": "end"}, b"suffix"),
           ("/v1/completions", {"best_of": 3}, b"best_of"),
           ("/v1/responses", {"text": {"format": {"type": "json_schema", "name": "x", "schema": {"type": "?"}}}},
            b"text.format")]
    ok = [("/v1/chat/completions", {"response_format": {"type": "text"}, "logit_bias": {}, "presence_penalty": 0,
                                    "frequency_penalty": 0.0, "tool_choice": "auto"}),
          ("/v1/completions", {"echo": False, "suffix": "", "best_of": 1}),
          ("/v1/responses", {"text": {"format": {"type": "text"}}})]
    base = {"/v1/chat/completions": {"model": "m", "max_tokens": 2, "messages": user("hi")},
            "/v1/completions": {"model": "m", "max_tokens": 2, "prompt": "hi"},
            "/v1/responses": {"model": "m", "max_output_tokens": 2, "input": "hi"}}
    with Server("--trace", trace) as s:
        for path, extra, word in bad:
            st, _, body = s.raw("POST", path, {**base[path], **extra})
            assert st == 400 and word in body, (path, extra, st, body)
        for path, extra in ok:
            st, _, body = s.raw("POST", path, {**base[path], **extra})
            assert st == 200, (path, extra, body)
        img = {"url": "data:image/png;base64,iVBORw0KGgo="}
        st, _, body = s.raw("POST", "/v1/chat/completions", {**base["/v1/chat/completions"], "messages": [
            {"role": "user", "content": [{"type": "text", "text": "What is this?"},
                                         {"type": "image_url", "image_url": img}]}]})
        assert st == 200, body
        st, _, body = s.raw("POST", "/v1/messages", {"model": "m", "max_tokens": 2, "messages": [
            {"role": "user", "content": [{"type": "image", "source": {"type": "base64", "media_type": "image/png",
                                                                       "data": "iVBORw0KGgo="}},
                                         {"type": "text", "text": "Describe it"}]}]})
        assert st == 200, body
        st, _, body = s.raw("POST", "/v1/responses", {"model": "m", "max_output_tokens": 2, "input": [
            {"role": "user", "content": [{"type": "input_text", "text": "And this?"},
                                         {"type": "input_image", "image_url": img["url"]}]}]})
        assert st == 200, body
    t = trace.read_text(errors="replace")
    assert t.count("[image omitted: this model reads text only]") == 3, t[-3000:]


def test_vocabulary_padding_tokens_never_reach_the_text():
    """The [PADn] tokens of the vocabulary's gap (GGUF token type UNUSED) are control tokens, not text: a sampled
    one adds nothing to the reply (an outside client pass saw '[PAD129026]' in content with this request)."""
    with Server() as s:
        r = s.openai().chat.completions.create(model="m", messages=user("Tell me a story"), max_tokens=60, seed=3,
                                               extra_body={"think": False, "min_p": 0})
        assert "[PAD" not in (r.choices[0].message.content or ""), r.choices[0].message.content


def test_http_details_from_an_outside_pass():
    """A charset other than UTF-8 is a 415 (it was read as UTF-8); an Anthropic request without max_tokens is a
    400 as the Messages API's (it generated to the end of the context), while count_tokens needs none."""
    with Server() as s:
        body = {"model": "m", "max_tokens": 2, "messages": user("x")}
        for ct, want in [("application/json; charset=utf-16", 415), ("application/json; charset=latin1", 415),
                         ("application/json; charset=UTF-8", 200), ("application/json;charset=\"utf-8\"", 200)]:
            st, _, data = s.raw("POST", "/v1/chat/completions", body, headers={"Content-Type": ct})
            assert st == want, (ct, st, data)
        st, _, data = s.raw("POST", "/v1/messages", {"model": "m", "messages": user("x")})
        assert st == 400 and b"max_tokens: Field required" in data, data
        st, _, data = s.raw("POST", "/v1/messages/count_tokens", {"model": "m", "messages": user("x")})
        assert st == 200 and b"input_tokens" in data, data


def test_http_details_from_a_third_outside_pass():
    """A compressed body (Codex CLI can zstd-compress /v1/responses) is a 415 naming the encoding, not "invalid
    JSON"; a 405 carries the Allow header (RFC 9110 15.5.6); an Anthropic prompt over the context gets Anthropic's
    wording, "prompt is too long: N tokens > M maximum" (Claude Code compacts the conversation on it)."""
    import gzip
    with Server(ctx=256) as s:
        body = json.dumps({"model": "m", "max_tokens": 2, "messages": user("x")}).encode()
        for enc, data_ in [("gzip", gzip.compress(body)), ("zstd", b"\x28\xb5\x2f\xfd" + body), ("br", body)]:
            st, _, data = s.raw("POST", "/v1/chat/completions", data_,
                                headers={"Content-Type": "application/json", "Content-Encoding": enc})
            assert st == 415 and ("Content-Encoding %s is not supported" % enc).encode() in data, (enc, st, data)
        st, _, data = s.raw("POST", "/v1/chat/completions", body,
                            headers={"Content-Type": "application/json", "Content-Encoding": "identity"})
        assert st == 200, data
        for method, path, allow in [("DELETE", "/v1/chat/completions", "POST, OPTIONS"),
                                    ("GET", "/v1/messages", "POST, OPTIONS"),
                                    ("POST", "/v1/models", "GET, HEAD, OPTIONS"),
                                    ("PUT", "/v1/models", "GET, HEAD, OPTIONS")]:
            st, hdr, data = s.raw(method, path, {} if method in ("POST", "PUT") else None)
            assert st == 405 and hdr.get("Allow") == allow, (method, path, st, hdr)
        st, _, data = s.raw("POST", "/v1/messages", {"model": "m", "max_tokens": 2, "messages": user("hello " * 400)})
        msg = json.loads(data)["error"]["message"]
        assert st == 400 and re.fullmatch(r"prompt is too long: \d+ tokens > 255 maximum", msg), (st, data)
        try:
            s.anthropic().messages.create(model="m", max_tokens=2, messages=user("hello " * 400))
            assert False, "no error"
        except anthropic.BadRequestError as ex:
            assert "prompt is too long" in str(ex)


APPLY_PATCH = {"type": "custom", "name": "apply_patch", "description": "Edit files with a patch",
               "format": {"type": "grammar", "syntax": "lark",
                          "definition": 'start: "*** Begin Patch" LF hunk+ "*** End Patch"'}}
FG = [{"type": "function", "name": n, "parameters": {"type": "object", "properties": {"x": {"type": "string"}}}}
      for n in ("f", "g")]


def test_responses_custom_tools_come_back_as_custom_tool_calls():
    """A Responses custom (freeform) tool, as Codex's apply_patch: the model sees a function with one string
    parameter `input` (the format's grammar in its description) and the call goes back as a custom_tool_call item
    with that input (stream: custom_tool_call_input delta/done), the same streamed and not; a custom_tool_call in
    the input history is accepted; chat custom tools are a 400 naming tools."""
    with Server() as s:
        c = s.openai()
        kw = dict(model="m", input="Fix the bug", tools=[APPLY_PATCH] + FG, max_output_tokens=60, temperature=0,
                  tool_choice={"type": "custom", "name": "apply_patch"}, reasoning={"effort": "none"})
        r = c.responses.create(**kw)
        calls = [o for o in r.output if o.type == "custom_tool_call"]
        assert len(calls) == 1 and calls[0].name == "apply_patch" and isinstance(calls[0].input, str), r.output
        assert not [o for o in r.output if o.type == "function_call"]
        evs = list(c.responses.create(stream=True, **kw))
        types = [e.type for e in evs]
        assert "response.custom_tool_call_input.done" in types and "response.function_call_arguments.done" not in types
        done = [e for e in evs if e.type == "response.custom_tool_call_input.done"][0]
        deltas = "".join(e.delta for e in evs if e.type == "response.custom_tool_call_input.delta")
        item = [e.item for e in evs if e.type == "response.output_item.done" and e.item.type == "custom_tool_call"][0]
        assert done.input == deltas == item.input == calls[0].input
        assert evs[-1].response.output[-1].input == calls[0].input
        # the format's grammar is part of what the model reads (the prompt grows by it)
        bare = dict(APPLY_PATCH, format={"type": "text"})
        n = [c.responses.create(model="m", input="x", tools=[t], max_output_tokens=1, extra_body=NO_THINK)
             .usage.input_tokens for t in (bare, APPLY_PATCH)]
        assert n[1] > n[0] + 5, n
        hist = [{"type": "message", "role": "user", "content": "Fix"},
                {"type": "custom_tool_call", "call_id": "c1", "name": "apply_patch",
                 "input": "*** Begin Patch\n*** End Patch"},
                {"type": "custom_tool_call_output", "call_id": "c1", "output": "done"}]
        r3 = c.responses.create(model="m", input=hist, tools=[APPLY_PATCH], max_output_tokens=3, extra_body=NO_THINK)
        assert r3.usage.input_tokens > 0
        st, _, data = s.raw("POST", "/v1/chat/completions",
                            {"messages": user("x"), "tools": [{"type": "custom", "custom": {"name": "p"}}]})
        assert st == 400 and json.loads(data)["error"]["param"] == "tools", data


def test_allowed_tools_restrict_the_calls():
    """tool_choice allowed_tools (Responses and chat forms): the model sees only the listed tools, so a required
    call is one of them; a list naming none of the tools is a 400."""
    with Server() as s:
        c = s.openai()
        for seed in (1, 2, 3):
            r = c.responses.create(model="m", input="go", tools=FG, max_output_tokens=40,
                                   tool_choice={"type": "allowed_tools", "mode": "required",
                                                "tools": [{"type": "function", "name": "g"}]},
                                   extra_body=dict(NO_THINK, seed=seed))
            assert [o.name for o in r.output if o.type == "function_call"] == ["g"], r.output
            cc = c.chat.completions.create(
                model="m", messages=user("go"), max_tokens=40, seed=seed, extra_body=NO_THINK,
                tools=[{"type": "function", "function": {"name": n, "parameters": {"type": "object", "properties": {}}}}
                       for n in ("f", "g")],
                tool_choice={"type": "allowed_tools",
                             "allowed_tools": {"mode": "required", "tools": [{"type": "function",
                                                                              "function": {"name": "g"}}]}})
            assert [t.function.name for t in cc.choices[0].message.tool_calls] == ["g"]
        st, _, data = s.raw("POST", "/v1/responses", {"model": "m", "input": "go", "tools": FG,
                                                      "tool_choice": {"type": "allowed_tools", "mode": "auto",
                                                                      "tools": [{"type": "function", "name": "h"}]}})
        assert st == 400 and json.loads(data)["error"]["param"] == "tool_choice", data


def test_fields_that_would_change_the_reply_are_refused():
    """Legacy chat functions/function_call, Responses prompt templates, background mode and logprobs: a 400 naming
    the field, not a reply that silently lacks what they ask for."""
    with Server() as s:
        for path, body, param in [
                ("/v1/chat/completions", {"messages": user("x"), "functions": [{"name": "f"}]}, "functions"),
                ("/v1/chat/completions", {"messages": user("x"), "function_call": "auto"}, "function_call"),
                ("/v1/responses", {"input": "x", "prompt": {"id": "pmpt_1"}}, "prompt"),
                ("/v1/responses", {"input": "x", "background": True}, "background"),
                ("/v1/responses", {"input": "x", "top_logprobs": 3}, "top_logprobs"),
                ("/v1/responses", {"input": "x", "include": ["message.output_text.logprobs"]}, "include")]:
            st, _, data = s.raw("POST", path, body)
            assert st == 400 and json.loads(data)["error"]["param"] == param, (path, body, st, data)
        st, _, data = s.raw("POST", "/v1/responses", {"input": "x", "background": False, "max_output_tokens": 1,
                                                      "include": ["reasoning.encrypted_content"]})
        assert st == 200, data


def test_a_call_cut_by_the_token_limit_leaves_no_markup():
    """A forced tool call cut by max_tokens (inside the block or its opening tag): finish length / max_tokens /
    incomplete, no tool call and no DSML markup in the text (clients show it and send it back), streamed as not."""
    tool_a = {"name": "bash", "input_schema": BASH_TOOL["function"]["parameters"]}
    tool_r = {"type": "function", "name": "bash", "parameters": BASH_TOOL["function"]["parameters"]}
    with Server() as s:
        c, a = s.openai(), s.anthropic()
        for mt in (2, 3, 6, 12, 20):
            kw = dict(model="m", messages=user("run ls"), tools=[BASH_TOOL], tool_choice="required", max_tokens=mt,
                      temperature=0, extra_body=NO_THINK)
            r = c.chat.completions.create(**kw)
            st = "".join(ch.choices[0].delta.content or "" for ch in c.chat.completions.create(stream=True, **kw)
                         if ch.choices)
            m = r.choices[0].message
            assert r.choices[0].finish_reason == "length" and not m.tool_calls, (mt, r)
            assert "DSML" not in (m.content or "") and (m.content or "") == st, (mt, m.content, st)
            am = a.messages.create(model="m", max_tokens=mt, messages=user("run ls"), tools=[tool_a],
                                   tool_choice={"type": "any"}, extra_body=dict(NO_THINK, temperature=0))
            assert am.stop_reason == "max_tokens" and all(b.type == "text" and "DSML" not in b.text
                                                          for b in am.content), (mt, am)
            rr = c.responses.create(model="m", input="run ls", tools=[tool_r], tool_choice="required",
                                    max_output_tokens=mt, temperature=0, extra_body=NO_THINK)
            assert rr.status == "incomplete" and "DSML" not in rr.output_text, (mt, rr.output)
            assert not [o for o in rr.output if o.type == "function_call"]


def test_forced_calls_follow_the_schema_types():
    """A forced call (tool_choice required) takes the schema's types: integers and numbers of several digits
    (they were one digit), string enums among their values, anyOf [integer, null] as an integer; so the openai
    SDK's strict pydantic tools parse (their schema validation ran on every seed). (No string field: the random
    demo model never closes one, so it would run to the limit: test_forced_calls_keep_long_string_values_...)"""
    from typing import Literal, Optional
    import openai
    import pydantic

    class Search(pydantic.BaseModel):
        limit: int
        mode: Literal["fast", "deep"]
        ratio: float
        opt: Optional[int]

    tool = openai.pydantic_function_tool(Search)
    with Server() as s:
        c = s.openai()
        for seed in range(1, 5):
            r = c.chat.completions.parse(model="m", messages=user("search"), tools=[tool], tool_choice="required",
                                         max_tokens=300, extra_body=dict(NO_THINK, seed=seed))
            a = r.choices[0].message.tool_calls[0].function.parsed_arguments
            assert isinstance(a, Search) and a.mode in ("fast", "deep"), a
            raw = json.loads(r.choices[0].message.tool_calls[0].function.arguments)
            assert isinstance(raw["limit"], int) and isinstance(raw["opt"], (int, type(None)))
            assert isinstance(raw["ratio"], (int, float)), raw


CODE = ("#include <stdio.h>\n\nint main(void) {\n    for (int i = 0; i < 10; i++)\n"
        "        printf(\"%d < %d && %d > 0\\n\", i, i + 1, i);\n    return 0; /* <tag> a</b> */\n}\n") * 6


def write_call(content, close=True):
    """The DSML block of a write_file(path, content) call, as the model writes it."""
    tail = "</{m}parameter>\n</{m}invoke>\n</{m}tool_calls>" if close else ""
    return ("\n\n<{m}tool_calls>\n<{m}invoke name=\"write_file\">\n<{m}parameter name=\"path\" string=\"true\">"
            "a.c</{m}parameter>\n<{m}parameter name=\"content\" string=\"true\">").format(m=M) + content + \
        tail.format(m=M)


WRITE = {"type": "object", "properties": {"path": {"type": "string"}, "content": {"type": "string"}},
         "required": ["path", "content"]}


def test_forced_calls_keep_long_string_values_with_markup():
    """A forced call's string value is the model's until it writes the closing tag itself: C code of ~400 tokens
    with '<', '&&' and '</b>' comes back whole, stream and not, in every API. The value was cut at its first '<'
    or after 64 tokens and the call still reported as complete (tool_calls): a forced write_file lost its
    content without a word. (--debug-reply plays the model: the forced rules still decide each token.)"""
    want = {"path": "a.c", "content": CODE}
    with Server("--debug-reply", write_call(CODE), ctx=4096) as s:
        c, a = s.openai(), s.anthropic()
        for choice in ("required", {"type": "function", "function": {"name": "write_file"}}):
            r = c.chat.completions.create(model="m", messages=user("write it"), max_tokens=2000,
                                          tools=[{"type": "function", "function": {"name": "write_file",
                                                                                   "parameters": WRITE}}],
                                          tool_choice=choice, extra_body=NO_THINK)
            assert r.choices[0].finish_reason == "tool_calls", r
            assert json.loads(r.choices[0].message.tool_calls[0].function.arguments) == want
            st = c.chat.completions.create(model="m", messages=user("write it"), max_tokens=2000, stream=True,
                                           tools=[{"type": "function", "function": {"name": "write_file",
                                                                                    "parameters": WRITE}}],
                                           tool_choice=choice, extra_body=NO_THINK)
            frags, fin = [], None
            for ch in st:
                if ch.choices:
                    fin = ch.choices[0].finish_reason or fin
                    for tc in ch.choices[0].delta.tool_calls or []:
                        frags.append(tc.function.arguments or "")
            assert fin == "tool_calls" and json.loads("".join(frags)) == want
        m = a.messages.create(model="m", max_tokens=2000, messages=user("write it"),
                              tools=[{"name": "write_file", "input_schema": WRITE}], tool_choice={"type": "any"},
                              extra_body=NO_THINK)
        assert m.stop_reason == "tool_use" and [b.input for b in m.content if b.type == "tool_use"] == [want], m
        rr = c.responses.create(model="m", input="write it", max_output_tokens=2000, tool_choice="required",
                                tools=[{"type": "function", "name": "write_file", "parameters": WRITE}],
                                reasoning={"effort": "none"})
        calls = [o for o in rr.output if o.type == "function_call"]
        assert rr.status == "completed" and [json.loads(o.arguments) for o in calls] == [want], rr.output


def test_forced_calls_cut_by_the_budget_report_the_limit():
    """A forced call whose value the token limit cuts is still closed (well-formed markup, every required
    property written), but the reply says the limit shaped it: OpenAI finish "length", Anthropic
    "max_tokens", Responses "incomplete" -- never a complete-looking call with half its content (it was
    "tool_calls"). A value the model ends with EOS is its own end: "tool_calls"."""
    tool = {"type": "function", "function": {"name": "write_file", "parameters": WRITE}}
    with Server("--debug-reply", write_call(CODE), ctx=4096) as s:
        c, a = s.openai(), s.anthropic()
        r = c.chat.completions.create(model="m", messages=user("write it"), max_tokens=150, tools=[tool],
                                      tool_choice="required", extra_body=NO_THINK)
        assert r.choices[0].finish_reason == "length", r
        args = json.loads(r.choices[0].message.tool_calls[0].function.arguments)
        assert args["path"] == "a.c" and CODE.startswith(args["content"]) and len(args["content"]) < len(CODE)
        m = a.messages.create(model="m", max_tokens=150, messages=user("write it"),
                              tools=[{"name": "write_file", "input_schema": WRITE}], tool_choice={"type": "any"},
                              extra_body=NO_THINK)
        assert m.stop_reason == "max_tokens", m
        rr = c.responses.create(model="m", input="write it", max_output_tokens=150, tool_choice="required",
                                tools=[{"type": "function", "name": "write_file", "parameters": WRITE}],
                                reasoning={"effort": "none"})
        assert rr.status == "incomplete", rr
    # the model ends its turn inside the value (EOS): the value ends there, the call is whole
    with Server("--debug-reply", write_call("x < y", close=False), ctx=4096) as s:
        r = s.openai().chat.completions.create(model="m", messages=user("write it"), max_tokens=400, tools=[tool],
                                               tool_choice="required", extra_body=NO_THINK)
        assert r.choices[0].finish_reason == "tool_calls", r
        assert json.loads(r.choices[0].message.tool_calls[0].function.arguments) == {"path": "a.c",
                                                                                    "content": "x < y"}


def test_forced_calls_write_enum_values_with_markup_characters():
    """Enum and const values with '&' or '<' ("R&D", "a<b") are offered and come back exact, stream and not, on
    chat and Anthropic: they were left out of the choice ('R&D' never came; a one-value enum of one came out
    null, breaking the schema). The block carries them as JSON escapes."""
    schema = {"type": "object", "properties": {"dept": {"type": "string", "enum": ["R&D"]},
                                               "op": {"const": "a<b"},
                                               "pick": {"enum": ["x&y", "<tag>", "plain"]}},
              "required": ["dept", "op", "pick"]}
    tool = {"type": "function", "function": {"name": "route", "parameters": schema}}
    with Server() as s:
        c, a = s.openai(), s.anthropic()
        picks = set()
        for seed in range(1, 7):
            r = c.chat.completions.create(model="m", messages=user("route it"), tools=[tool], tool_choice="required",
                                          max_tokens=200, temperature=1, extra_body=dict(NO_THINK, seed=seed))
            args = json.loads(r.choices[0].message.tool_calls[0].function.arguments)
            assert args["dept"] == "R&D" and args["op"] == "a<b" and args["pick"] in ("x&y", "<tag>", "plain"), args
            picks.add(args["pick"])
            st = c.chat.completions.create(model="m", messages=user("route it"), tools=[tool], tool_choice="required",
                                           max_tokens=200, temperature=1, stream=True,
                                           extra_body=dict(NO_THINK, seed=seed))
            frag = "".join(ch.choices[0].delta.tool_calls[0].function.arguments or "" for ch in st
                           if ch.choices and ch.choices[0].delta.tool_calls)
            assert json.loads(frag) == args, (frag, args)
        assert picks & {"x&y", "<tag>"}, picks  # the markup values are chosen too (6 seeds at temperature 1)
        m = a.messages.create(model="m", max_tokens=200, messages=user("route it"), tool_choice={"type": "any"},
                              tools=[{"name": "route", "input_schema": schema}], extra_body={"seed": 3})
        block = next(b for b in m.content if b.type == "tool_use")
        assert block.input["dept"] == "R&D" and block.input["op"] == "a<b", block.input


def test_thinking_budget_closes_the_reasoning():
    """thinking.budget_tokens (Anthropic; also accepted on chat): the reasoning is closed with </think> once it
    has that many tokens, and the answer follows; without it the reasoning runs on (random demo weights)."""
    with Server() as s:
        c = s.openai()
        free = c.chat.completions.create(model="m", messages=user("think"), max_tokens=60,
                                         extra_body={"thinking": {"type": "enabled"}, "seed": 5})
        assert free.usage.completion_tokens_details.reasoning_tokens == 60
        for b in (3, 10):
            r = c.chat.completions.create(model="m", messages=user("think"), max_tokens=60,
                                          extra_body={"thinking": {"type": "enabled", "budget_tokens": b}, "seed": 5})
            # the budget's tokens and the closing </think>
            assert r.usage.completion_tokens_details.reasoning_tokens == b + 1, r.usage
            assert r.choices[0].message.reasoning_content and r.choices[0].message.content
        a = s.anthropic().messages.create(model="m", max_tokens=40, messages=user("think"),
                                          thinking={"type": "enabled", "budget_tokens": 8}, extra_body={"seed": 5})
        assert [b.type for b in a.content] == ["thinking", "text"] and a.content[1].text, a.content
        for bad in ("x", 0, -3):
            st, _, data = s.raw("POST", "/v1/messages", {"model": "m", "max_tokens": 5, "messages": user("x"),
                                                         "thinking": {"type": "enabled", "budget_tokens": bad}})
            assert st == 400, (bad, data)


M = "\uff5cDSML\uff5c"
TWO_CALLS = ("Sure.\n\n<{m}tool_calls>\n<{m}invoke name=\"bash\">\n<{m}parameter name=\"command\" string=\"true\">ls"
             "</{m}parameter>\n</{m}invoke>\n<{m}invoke name=\"bash\">\n<{m}parameter name=\"command\" "
             "string=\"true\">pwd</{m}parameter>\n</{m}invoke>\n</{m}tool_calls>").format(m=M)


DUP_PARAM = ("ok\n\n<{m}tool_calls>\n<{m}invoke name=\"bash\">\n<{m}parameter name=\"command\" string=\"true\">ls"
             "</{m}parameter>\n<{m}parameter name=\"command\" string=\"true\">rm -rf /</{m}parameter>\n</{m}invoke>\n"
             "</{m}tool_calls>").format(m=M)


def test_repeated_parameter_name_gives_the_same_arguments_on_every_api():
    """A call that names one parameter twice (the reply scripted with --debug-reply): chat and Responses sent
    {"command":"ls","command":"rm -rf /"} (both members; clients' JSON parsers keep the last) and Anthropic the
    last one; now every API, streamed or not, has the first one only."""
    tool_a = {"name": "bash", "input_schema": BASH_TOOL["function"]["parameters"]}
    with Server("--debug-reply", DUP_PARAM) as s:
        c, a = s.openai(), s.anthropic()
        r = c.chat.completions.create(model="m", messages=user("go"), tools=[BASH_TOOL], max_tokens=200, extra_body=NO_THINK)
        raw = r.choices[0].message.tool_calls[0].function.arguments
        assert json.loads(raw) == {"command": "ls"} and raw.count("command") == 1, raw
        st = c.chat.completions.create(model="m", messages=user("go"), tools=[BASH_TOOL], max_tokens=200, stream=True,
                                      extra_body=NO_THINK)
        frag = "".join(ch.choices[0].delta.tool_calls[0].function.arguments or "" for ch in st
                       if ch.choices and ch.choices[0].delta.tool_calls)
        assert frag.count("command") == 1 and json.loads(frag) == {"command": "ls"}, frag
        m = a.messages.create(model="m", max_tokens=200, messages=user("go"), tools=[tool_a], extra_body=NO_THINK)
        assert next(b for b in m.content if b.type == "tool_use").input == {"command": "ls"}
        rr = c.responses.create(model="m", input="go", max_output_tokens=200, reasoning={"effort": "none"},
                                tools=[{"type": "function", "name": "bash",
                                        "parameters": BASH_TOOL["function"]["parameters"]}])
        call = next(o for o in rr.output if o.type == "function_call")
        assert json.loads(call.arguments) == {"command": "ls"} and call.arguments.count("command") == 1


def test_parallel_tool_calls_off_keeps_the_first_call():
    """A block with two calls (the reply scripted with --debug-reply): both by default; with parallel_tool_calls
    false (chat, Responses) or disable_parallel_tool_use (Anthropic) only the first, streamed as not."""
    tool_a = {"name": "bash", "input_schema": BASH_TOOL["function"]["parameters"]}
    tool_r = {"type": "function", "name": "bash", "parameters": BASH_TOOL["function"]["parameters"]}
    with Server("--debug-reply", TWO_CALLS) as s:
        c, a = s.openai(), s.anthropic()
        for par, want in [(None, ["ls", "pwd"]), (True, ["ls", "pwd"]), (False, ["ls"])]:
            kw = dict(model="m", messages=user("run"), tools=[BASH_TOOL], max_tokens=200, extra_body=NO_THINK)
            if par is not None:
                kw["parallel_tool_calls"] = par
            r = c.chat.completions.create(**kw)
            got = [json.loads(t.function.arguments)["command"] for t in r.choices[0].message.tool_calls]
            assert got == want and r.choices[0].finish_reason == "tool_calls", (par, r)
            assert r.choices[0].message.content == "Sure."
            args = {}
            for ch in c.chat.completions.create(stream=True, **kw):
                for t in (ch.choices[0].delta.tool_calls or []) if ch.choices else []:
                    args[t.index] = args.get(t.index, "") + (t.function.arguments or "")
            assert [json.loads(args[i])["command"] for i in sorted(args)] == want, (par, args)
        for dis, want in [(False, 2), (True, 1)]:
            m = a.messages.create(model="m", max_tokens=200, messages=user("run"), tools=[tool_a],
                                  tool_choice={"type": "auto", "disable_parallel_tool_use": dis}, extra_body=NO_THINK)
            uses = [b for b in m.content if b.type == "tool_use"]
            assert len(uses) == want and uses[0].input == {"command": "ls"} and m.stop_reason == "tool_use", m
        for par, want in [(True, 2), (False, 1)]:
            rr = c.responses.create(model="m", input="run", tools=[tool_r], parallel_tool_calls=par,
                                    max_output_tokens=200, reasoning={"effort": "none"})
            calls = [o for o in rr.output if o.type == "function_call"]
            assert len(calls) == want and json.loads(calls[0].arguments) == {"command": "ls"}, rr.output



def test_custom_tool_input_is_the_models_bytes():
    """A custom tool's input is the model's text as written: no entity decoding (a patch's literal "&amp;" or
    "&lt;" stays), and a non-string input is its JSON text (was wrapped as {"input": ...})."""
    patch = '*** Begin Patch\n<a href="x">&amp; &lt;b&gt;</a>\n*** End Patch'
    reply = ("ok\n\n<{m}tool_calls>\n<{m}invoke name=\"apply_patch\">\n<{m}parameter name=\"input\" "
             "string=\"true\">{p}</{m}parameter>\n</{m}invoke>\n</{m}tool_calls>").format(m=M, p=patch)
    with Server("--debug-reply", reply) as s:
        c = s.openai()
        r = c.responses.create(model="m", input="fix", tools=[APPLY_PATCH], max_output_tokens=300,
                               reasoning={"effort": "none"})
        calls = [o for o in r.output if o.type == "custom_tool_call"]
        assert len(calls) == 1 and calls[0].input == patch, r.output
        evs = list(c.responses.create(model="m", input="fix", tools=[APPLY_PATCH], max_output_tokens=300,
                                      reasoning={"effort": "none"}, stream=True))
        done = [e for e in evs if e.type == "response.custom_tool_call_input.done"]
        assert len(done) == 1 and done[0].input == patch
    reply2 = ("<{m}tool_calls>\n<{m}invoke name=\"apply_patch\">\n<{m}parameter name=\"input\" "
              "string=\"false\">[1, 2]</{m}parameter>\n</{m}invoke>\n</{m}tool_calls>").format(m=M)
    with Server("--debug-reply", reply2) as s:
        r = s.openai().responses.create(model="m", input="fix", tools=[APPLY_PATCH], max_output_tokens=300,
                                        reasoning={"effort": "none"})
        calls = [o for o in r.output if o.type == "custom_tool_call"]
        assert len(calls) == 1 and json.loads(calls[0].input) == [1, 2], r.output


def test_custom_tool_names_and_choices_must_agree():
    """A custom tool sharing its name with another tool, a custom tool inside a namespace, and a tool_choice
    whose type disagrees with the named tool are 400s (calls were returned as the other kind)."""
    fn = {"type": "function", "name": "apply_patch", "parameters": {"type": "object", "properties": {}}}
    ns = {"type": "namespace", "name": "ns", "description": "d", "tools": [APPLY_PATCH]}
    with Server() as s:
        for body, param in [({"tools": [APPLY_PATCH, fn]}, "tools"), ({"tools": [ns]}, "tools"),
                            ({"tools": [APPLY_PATCH] + FG, "tool_choice": {"type": "custom", "name": "f"}},
                             "tool_choice"),
                            ({"tools": [APPLY_PATCH] + FG, "tool_choice": {"type": "function", "name": "apply_patch"}},
                             "tool_choice")]:
            st, _, data = s.raw("POST", "/v1/responses", dict({"model": "m", "input": "x"}, **body))
            assert st == 400 and json.loads(data)["error"]["param"] == param, (body, data)
        st, _, data = s.raw("POST", "/v1/chat/completions",
                            {"messages": user("x"), "tool_choice": {"type": "allowed_tools", "allowed_tools": {
                                "mode": "auto", "tools": [{"type": "function", "function": {"name": "f"}}]}}})
        assert st == 400 and "needs tools in the request" in json.loads(data)["error"]["message"], data


def test_forced_calls_follow_refs_consts_and_the_thinking_budget():
    """Forced calls resolve $ref/$defs (pydantic's Enum fields), const (a one-value Literal) and Optional[Enum];
    a thinking budget also closes the reasoning of a forced call."""
    from enum import Enum
    from typing import Literal, Optional
    import openai
    import pydantic

    class Unit(str, Enum):
        c = "celsius"
        f = "fahrenheit"

    class Flat(pydantic.BaseModel):
        unit: Unit
        kind: Literal["daily"]
        days: int
        ok: bool
        alt: Optional[Unit]

    tool = openai.pydantic_function_tool(Flat)
    with Server() as s:
        c = s.openai()
        for seed in range(1, 5):
            r = c.chat.completions.parse(model="m", messages=user("weather"), tools=[tool], tool_choice="required",
                                         max_tokens=200, extra_body=dict(NO_THINK, seed=seed))
            a = r.choices[0].message.tool_calls[0].function.parsed_arguments
            assert isinstance(a, Flat) and a.kind == "daily", a
        tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {
            "x": {"type": "integer"}}, "required": ["x"]}}}]
        r = c.chat.completions.create(model="m", messages=user("go"), tools=tools, tool_choice="required",
                                      max_tokens=300, extra_body={"thinking": {"type": "enabled", "budget_tokens": 7},
                                                                  "seed": 3})
        assert r.usage.completion_tokens_details.reasoning_tokens <= 8, r.usage
        assert r.choices[0].message.tool_calls, r.choices[0].message



def test_a_scripted_reply_cut_at_every_length_leaves_no_markup():
    """Text then a tool-call block (scripted), cut by max_tokens at every length: the text before the block, no
    markup ('<' after the blank line included), the same streamed."""
    with Server("--debug-reply", "Done" + TWO_CALLS[len("Sure."):]) as s:
        c = s.openai()
        for mt in range(1, 120):
            kw = dict(model="m", messages=user("run"), tools=[BASH_TOOL], max_tokens=mt, extra_body=NO_THINK)
            r = c.chat.completions.create(**kw)
            text = r.choices[0].message.content or ""
            st = "".join(ch.choices[0].delta.content or "" for ch in c.chat.completions.create(stream=True, **kw)
                         if ch.choices)
            assert "<" not in text and "DSML" not in text and text == st, (mt, text, st)
            if r.choices[0].finish_reason == "tool_calls":
                break
        else:
            assert False, "the block never completed"


@pytest.mark.parametrize("value,want", [
    ("{notjson", "{notjson"), ("007", "007"), ("NaN", "NaN"), ("", ""), ("{'force': True}", "{'force': True}"),
    ('"\\ud800"', "\ufffd" * 3),  # a lone surrogate: its WTF-8 bytes, then U+FFFD each (TEXT C.6), in both
    ('"a\\/b\\u00e9"', "a/b\u00e9"), ('{"x": [1, 2]}', {"x": [1, 2]}), ("7", 7)])
def test_json_typed_tool_arguments_are_valid_json_and_the_same_streamed_or_not(value, want):
    """A string="false" parameter whose value is not JSON became invalid JSON in the stream (the Anthropic SDK's
    accumulator raised) and {} in the reply (every other argument lost too): such a value is now a JSON string of
    its raw text in both, and a JSON string value is sent in one form by both."""
    reply = ("ok\n\n<{m}tool_calls>\n<{m}invoke name=\"bash\">\n<{m}parameter name=\"command\" string=\"true\">ls"
             "</{m}parameter>\n<{m}parameter name=\"opts\" string=\"false\">{v}</{m}parameter>\n</{m}invoke>\n"
             "</{m}tool_calls>").format(m=M, v=value)
    kw = dict(model="m", messages=user("go"), tools=[BASH_TOOL], max_tokens=300, extra_body={"think": False})
    with Server("--debug-reply", reply) as s:
        c = s.openai()
        a = chat_view(c.chat.completions.create(**kw))
        b = chat_stream_view(c.chat.completions.create(stream=True, **kw))
        assert a["calls"] == b["calls"] == [("bash", {"command": "ls", "opts": want})], (a, b)
        ac = s.anthropic()
        akw = dict(model="m", max_tokens=300, messages=[{"role": "user", "content": "go"}],
                   tools=[{"name": "bash", "input_schema": BASH_TOOL["function"]["parameters"]}],
                   thinking={"type": "disabled"})
        m1 = ac.messages.create(**akw)
        with ac.messages.stream(**akw) as st:
            m2 = st.get_final_message()
        i1 = [b.input for b in m1.content if b.type == "tool_use"]
        i2 = [b.input for b in m2.content if b.type == "tool_use"]
        assert i1 == i2 == [{"command": "ls", "opts": want}], (i1, i2)


def test_choices_that_mean_nothing_are_400s_not_silent_defaults():
    """An unknown thinking.type was taken as enabled, an unknown Anthropic tool_choice.type as auto, a chat
    tool_choice function without a name as auto, and tool_choice
    required/any without tools answered 200 in Responses and Anthropic (chat already said 400)."""
    tool = {"name": "bash", "input_schema": BASH_TOOL["function"]["parameters"]}
    anth = {"model": "m", "max_tokens": 4, "messages": [{"role": "user", "content": "hi"}]}
    cases = [
        ("/v1/messages", dict(anth, thinking={"type": "bogus"}), "thinking.type"),
        ("/v1/messages", dict(anth, tools=[tool], tool_choice={"type": "bogus"}), "tool_choice.type"),
        ("/v1/messages", dict(anth, tool_choice={"type": "any"}), "needs tools"),
        ("/v1/chat/completions", {"model": "m", "max_tokens": 4, "messages": user("hi"), "tools": [BASH_TOOL],
                                  "tool_choice": {"type": "function", "function": {}}}, "needs a name"),
        ("/v1/responses", {"model": "m", "input": "hi", "tool_choice": "required"}, "needs tools"),
    ]
    with Server() as s:
        for path, body, needle in cases:
            st, _, data = s.raw("POST", path, body)
            assert st == 400 and needle in data.decode(), (path, body, st, data)
        # the accepted forms still work
        for th in ({"type": "enabled", "budget_tokens": 16}, {"type": "disabled"}, {"type": "adaptive"}):
            st, _, data = s.raw("POST", "/v1/messages", dict(anth, thinking=th))
            assert st == 200, (th, data)
        st, _, data = s.raw("POST", "/v1/messages", dict(anth, tools=[tool], tool_choice={"type": "auto"}))
        assert st == 200, data


def test_forced_calls_write_every_required_property_before_the_budget_runs_out():
    """A forced call whose optional properties come first in the schema: a long optional value could spend
    max_tokens and the call closed without its required properties (an outside pass saw Bash without
    `command`, Edit without `new_string`, 6 of 24 Claude-Code-like requests). Now every required property is
    written (values may be short) whenever the budget leaves room for the tags, and the reply says the limit
    shaped the call (max_tokens: the random demo model closes no string value, so its values run to the limit)."""
    edit = {"name": "Edit", "input_schema": {"type": "object", "properties": {
        "description": {"type": "string"}, "notes": {"type": "string"}, "file_path": {"type": "string"},
        "old_string": {"type": "string"}, "new_string": {"type": "string"}},
        "required": ["file_path", "old_string", "new_string"]}}
    bash = {"name": "Bash", "input_schema": {"type": "object", "properties": {
        "description": {"type": "string"}, "timeout": {"type": "number"}, "command": {"type": "string"}},
        "required": ["command"]}}
    with Server(ctx=8192) as s:
        a = s.anthropic()
        for seed in range(1, 9):
            for mt in (120, 200):
                m = a.messages.create(model="m", max_tokens=mt, messages=user("fix the bug %d" % seed),
                                      tools=[edit, bash], tool_choice={"type": "any"},
                                      extra_body=dict(NO_THINK, seed=seed, temperature=1))
                calls = [b for b in m.content if b.type == "tool_use"]
                assert m.stop_reason == "max_tokens" and len(calls) == 1, (seed, mt, m)
                req = {"Edit": edit, "Bash": bash}[calls[0].name]["input_schema"]["required"]
                assert all(k in calls[0].input for k in req), (seed, mt, calls[0])


BIG = 123456789012345678901234


def test_integers_beyond_64_bits_in_tool_calls_and_requests():
    """JSON sets no range on integers; jansson refuses those beyond 64 bits. A tool call whose argument is
    such an integer came back as `input: {}` in a non-streamed Anthropic reply (every argument lost; the stream
    had the digits), and a request replaying it, or a schema with maximum 2^64-1, or seed 2^77, was a 400
    'invalid JSON request' (a Claude Code conversation could not go on). Now the reply carries the model's
    digits streamed or not, and requests read such integers as reals (SERVING B.4 reads every number so)."""
    reply = ("<{m}tool_calls>\n<{m}invoke name=\"bash\">\n<{m}parameter name=\"command\" string=\"true\">ls"
             "</{m}parameter>\n<{m}parameter name=\"timeout\" string=\"false\">%d</{m}parameter>\n</{m}invoke>\n"
             "</{m}tool_calls>").format(m=M) % BIG
    schema = {"type": "object", "properties": {"command": {"type": "string"}, "timeout": {"type": "integer"}},
              "required": ["command"]}
    body = {"model": "m", "max_tokens": 100, "messages": user("x"), "thinking": {"type": "disabled"},
            "tools": [{"name": "bash", "input_schema": schema}]}
    with Server("--debug-reply", reply) as s:
        got = raw_json(s, "/v1/messages", body)
        call = [b for b in got["content"] if b["type"] == "tool_use"][0]
        assert call["input"] == {"command": "ls", "timeout": BIG}, call
        st, _, data = s.raw("POST", "/v1/messages", dict(body, stream=True))
        assert st == 200
        streamed = "".join(e["delta"].get("partial_json", "") for _, e in sse(data)
                           if e and e.get("type") == "content_block_delta")
        assert json.loads(streamed) == call["input"], streamed
        with s.anthropic().messages.stream(**dict(body, model="m")) as ms:
            final = ms.get_final_message()
        assert [b.input for b in final.content if b.type == "tool_use"] == [call["input"]]
        # the conversation goes on: the call replayed, with its result
        turn2 = dict(body, messages=user("x") + [
            {"role": "assistant", "content": [dict(call)]},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": call["id"], "content": "ok"}]}])
        st, _, data = s.raw("POST", "/v1/messages", turn2)
        assert st == 200, data
        big_schema = dict(schema, properties=dict(schema["properties"],
                                                  timeout={"type": "integer", "maximum": 2 ** 64 - 1}))
        for path, b in [("/v1/messages", dict(body, tools=[{"name": "bash", "input_schema": big_schema}])),
                        ("/v1/chat/completions", {"model": "m", "max_tokens": 5, "messages": user("x"),
                                                  "seed": 2 ** 77})]:
            st, _, data = s.raw("POST", path, b)
            assert st == 200, (path, data)
        # beyond a double it stays an invalid request
        st, _, data = s.raw("POST", "/v1/chat/completions", {"model": "m", "messages": user("x"),
                                                              "seed": int("9" * 400)})
        assert st == 400 and b"invalid JSON request" in data, data


def test_unsupported_inputs_are_named_in_the_error():
    """What the server cannot take says which item or tool and why (an outside pass met a bare 'invalid JSON
    request' for a replayed Responses item with an unknown status, an item_reference item and a refusal
    part); Anthropic server tools (web_search_20250305, as Claude Code's WebSearch sends) were shown to the
    model as plain client tools, so it could call `web_search` as one: now a 400 naming the type; an
    Anthropic tool of type 'custom' (a client tool with an input_schema) is an ordinary tool (it was a 400)."""
    with Server() as s:
        base = {"model": "m", "max_output_tokens": 5, "reasoning": {"effort": "none"}}
        cases = [({"type": "message", "role": "assistant", "status": "cut",
                   "content": [{"type": "output_text", "text": "cut"}]}, "status 'cut'"),
                 ({"type": "item_reference", "id": "msg_1"}, "'item_reference'"),
                 ({"type": "message", "role": "assistant", "content": [{"type": "refusal", "refusal": "no"}]},
                  "'refusal'")]
        for item, want in cases:
            st, _, data = s.raw("POST", "/v1/responses", dict(base, input=[{"role": "user", "content": "hi"}, item]))
            assert st == 400, data
            err = json.loads(data)["error"]
            assert want in err["message"] and err["param"] == "input", err
        for status in ("completed", "incomplete", "in_progress"):
            st, _, data = s.raw("POST", "/v1/responses", dict(base, input=[
                {"type": "message", "role": "assistant", "status": status, "content": [{"type": "output_text",
                                                                                     "text": "ok"}]}]))
            assert st == 200, (status, data)
        a = {"model": "m", "max_tokens": 5, "messages": user("search"), "thinking": {"type": "disabled"}}
        for t in ({"type": "web_search_20250305", "name": "web_search", "max_uses": 5},
                  {"type": "bash_20250124", "name": "bash"}):
            st, _, data = s.raw("POST", "/v1/messages", dict(a, tools=[t]))
            assert st == 400, data
            err = json.loads(data)["error"]
            assert t["type"] in err["message"], err
        custom = dict(ANTH_TOOL, type="custom")
        m = s.anthropic().messages.create(model="m", max_tokens=200, messages=user("run ls"), tools=[custom],
                                          tool_choice={"type": "any"}, extra_body=NO_THINK)
        assert [b.name for b in m.content if b.type == "tool_use"] == ["Bash"], m.content


def test_logit_bias_and_penalties_change_the_reply():
    """logit_bias and the OpenAI penalties (they were 400s): +100 makes a
    token every greedy pick; a frequency penalty counts the repeats until
    another token wins; ids outside the vocabulary are a 400."""
    with Server() as s:
        c = s.openai()
        kw = dict(model="m", messages=user("hi"), max_tokens=80, temperature=0, logprobs=True,
                  extra_body=NO_THINK)
        plain = c.chat.completions.create(**kw)
        biased = c.chat.completions.create(logit_bias={"1000": 100}, **kw)
        toks = [t.token for t in biased.choices[0].logprobs.content]
        assert len(toks) == 80 and len(set(toks)) == 1, toks
        assert biased.choices[0].message.content != plain.choices[0].message.content
        pen = c.chat.completions.create(logit_bias={"1000": 100}, frequency_penalty=2.0, **kw)
        ptoks = [t.token for t in pen.choices[0].logprobs.content]
        n = next(i for i, t in enumerate(ptoks + [None]) if t != toks[0])
        assert 10 < n < 80, ptoks  # 100 - 2 * count falls below the next logit
        # a negative presence penalty only favours what was written: the bias still wins
        pres = c.chat.completions.create(logit_bias={"1000": 100}, presence_penalty=-2.0, **kw)
        assert pres.choices[0].message.content == biased.choices[0].message.content
        # completions too, and streaming gives the same text
        r = c.completions.create(model="m", prompt="hi", max_tokens=5, temperature=0, logit_bias={"1000": 100})
        import openai  # completions stream chunks carry finish_reason null, which strict validation refuses
        loose = openai.OpenAI(base_url=s.url + "/v1", api_key="none", max_retries=0)
        streamed = "".join(ch.choices[0].text for ch in loose.completions.create(
            model="m", prompt="hi", max_tokens=5, temperature=0, logit_bias={"1000": 100}, stream=True))
        assert streamed == r.choices[0].text == toks[0] * 5, (streamed, r.choices[0].text, toks[0])
        st, _, body = s.raw("POST", "/v1/chat/completions", {"model": "m", "max_tokens": 2, "messages": user("x"),
                                                             "logit_bias": {"129280": 1}})
        assert st == 400 and b"not in the vocabulary" in body, body


def test_ignore_eos_runs_to_max_tokens():
    """ignore_eos (the vLLM / llama.cpp extension load generators send): the end token is never sampled,
    even when logit_bias makes it every pick, so the reply is max_tokens long (finish length), streamed or
    not, on every API; a non-boolean is a 400."""
    with Server() as s:
        c = s.openai()
        kw = dict(model="m", messages=user("hi"), max_tokens=24, temperature=0, extra_body=NO_THINK)
        # id 1 is <｜end▁of▁sentence｜>: +100 ends the reply at once
        ended = c.chat.completions.create(logit_bias={"1": 100}, **kw)
        assert ended.choices[0].finish_reason == "stop" and ended.usage.completion_tokens == 0, ended
        for extra in ({"ignore_eos": True}, {"ignore_eos": True, "temperature": 0.8, "seed": 3}):
            r = c.chat.completions.create(**dict(kw, logit_bias={"1": 100}, extra_body=dict(NO_THINK, **extra)))
            assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 24, r
            assert r.choices[0].message.content, r
        r = c.chat.completions.create(**dict(kw, logit_bias={"1": 100}, extra_body=dict(NO_THINK, ignore_eos=True)))
        chunks = list(c.chat.completions.create(**dict(kw, logit_bias={"1": 100}, stream=True,
                                                       extra_body=dict(NO_THINK, ignore_eos=True))))
        assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == r.choices[0].message.content
        assert [ch.choices[0].finish_reason for ch in chunks if ch.choices and ch.choices[0].finish_reason] == ["length"]
        comp = c.completions.create(model="m", prompt="hi", max_tokens=9, temperature=0, logit_bias={"1": 100},
                                    extra_body={"ignore_eos": True})
        assert comp.choices[0].finish_reason == "length" and comp.usage.completion_tokens == 9, comp
        m = s.anthropic().messages.create(model="m", max_tokens=12, messages=user("hi"),
                                          extra_body=dict(NO_THINK, ignore_eos=True))
        assert m.stop_reason == "max_tokens" and m.usage.output_tokens == 12, m
        st, _, body = s.raw("POST", "/v1/chat/completions", {"model": "m", "max_tokens": 2, "messages": user("x"),
                                                             "ignore_eos": "yes"})
        assert st == 400, body


def test_counts_take_whole_number_reals_everywhere():
    """top_logprobs, completions' logprobs and thinking.budget_tokens take 2.0 as n, max_tokens and top_k do
    (JSON does not tell 2 from 2.0; they were a 400 "wrong type"); a fraction is still refused."""
    with Server() as s:
        chat = {"model": "m", "messages": user("hi"), "max_tokens": 2, "think": False, "logprobs": True}
        r = raw_json(s, "/v1/chat/completions", json.dumps(dict(chat, top_logprobs=2.0)))
        assert len(r["choices"][0]["logprobs"]["content"][0]["top_logprobs"]) == 2
        r = raw_json(s, "/v1/completions", json.dumps({"model": "m", "prompt": "hi", "max_tokens": 2, "logprobs": 3.0,
                                                       "think": False}))
        assert len(r["choices"][0]["logprobs"]["top_logprobs"][0]) == 3
        raw_json(s, "/v1/messages", json.dumps({"model": "m", "max_tokens": 4, "messages": user("hi"),
                                               "thinking": {"type": "enabled", "budget_tokens": 2.0}}))
        for path, body in (("/v1/chat/completions", dict(chat, top_logprobs=2.5)),
                           ("/v1/messages", {"model": "m", "max_tokens": 4, "messages": user("hi"),
                                             "thinking": {"type": "enabled", "budget_tokens": 2.5}})):
            st, _, data = s.raw("POST", path, json.dumps(body))
            assert st == 400, (path, data)


def test_numbers_in_tool_schemas_and_arguments_keep_their_digits(tmp_path):
    """Reals in a tool schema and in replayed call arguments reach the prompt in their shortest form (0.1, 1e-07,
    3.14159): json_dumps's 17 digits wrote 0.10000000000000001 and 9.9999999999999995e-08 into every prompt."""
    trace = tmp_path / "t.txt"
    tool = {"type": "function", "function": {"name": "set", "description": "d", "parameters": {
        "type": "object", "properties": {"x": {"type": "number", "minimum": 0.1, "maximum": 1e-7,
                                               "default": 3.14159, "examples": [100.0, 1500.0, 1e17]}}}}}
    hist = user("go") + [
        {"role": "assistant", "content": None, "tool_calls": [{"id": "call_z", "type": "function", "function": {
            "name": "set", "arguments": "{\"x\": 0.1, \"y\": 2.5e-3}"}}]},
        {"role": "tool", "tool_call_id": "call_z", "content": "ok"}]
    with Server("--trace", trace) as s:
        s.openai().chat.completions.create(model="m", messages=hist, tools=[tool], max_tokens=1, extra_body=NO_THINK)
    t = trace.read_text(errors="replace")
    assert '"minimum":0.1,"maximum":1e-07,"default":3.14159,"examples":[100.0,1500.0,1e+17]' in t, t[-3000:]
    assert "0.10000000000000001" not in t and "9.9999999999999995e-08" not in t
    assert ">0.1<" in t and ">2.5e-3<" in t, t[-3000:]  # OpenAI arguments are text: kept as written


@pytest.mark.parametrize("gap", ["\n", "  \n\n\n"])
def test_whitespace_before_a_tool_call_block_is_replayed(gap):
    """The content is trimmed and the remembered block kept only a blank line before its tag: a reply with "\\n" or
    "  \\n\\n\\n" there re-rendered otherwise than sampled, so the next turn re-prefilled the tool-call turn. Now the
    block starts where the content ends, and the next turn reuses the whole previous prompt + reply."""
    reply = ("Sure." + gap + "<{m}tool_calls>\n<{m}invoke name=\"bash\">\n<{m}parameter name=\"command\" string=\"true\">"
             "ls</{m}parameter>\n</{m}invoke>\n</{m}tool_calls>").format(m=M)
    with Server("--debug-reply", reply) as s:
        c = s.openai()
        r = c.chat.completions.create(model="m", messages=user("go"), tools=[BASH_TOOL], max_tokens=200,
                                      extra_body=NO_THINK)
        msg = r.choices[0].message
        assert msg.content == "Sure." and msg.tool_calls[0].function.name == "bash", msg
        live = r.usage.prompt_tokens + r.usage.completion_tokens
        hist = user("go") + [msg.model_dump(exclude_none=True),
                             {"role": "tool", "tool_call_id": msg.tool_calls[0].id, "content": "a.txt"}]
        r2 = c.chat.completions.create(model="m", messages=hist, tools=[BASH_TOOL], max_tokens=1, extra_body=NO_THINK)
        log = s.log_text()
        assert "kv reuse token-prefix" in log, log[-2000:]
        assert r2.usage.prompt_tokens_details.cached_tokens >= live - 1, (r2.usage, live)


def test_anthropic_cache_control_on_a_tool_is_not_in_the_prompt(tmp_path):
    """A cache breakpoint on a tool (Claude Code marks the last one, and moves it) is not part of the tool the model
    reads: it was written into the system block, so moving it changed the prompt and re-prefilled everything."""
    trace = tmp_path / "t.txt"
    bash = {"name": "Bash", "description": "Run", "input_schema": {"type": "object", "properties": {}}}
    with Server("--trace", trace) as s:
        c = s.anthropic()
        c.messages.create(model="m", max_tokens=1, messages=user("hi"), thinking={"type": "disabled"},
                          tools=[dict(bash, cache_control={"type": "ephemeral"})])
        c.messages.create(model="m", max_tokens=1, messages=user("hi"), thinking={"type": "disabled"}, tools=[bash])
        log = s.log_text()
    t = trace.read_text(errors="replace")
    assert "cache_control" not in t.split("--- rendered prompt")[1], t[-2000:]
    prompts = re.findall(r"prompt=(\d+) cached=(\d+)", log)
    assert len(prompts) == 2 and prompts[1][0] == prompts[1][1] == prompts[0][0], log[-2000:]  # all reused


def test_anthropic_plain_text_document_is_read(tmp_path):
    """An Anthropic document whose source is plain text ({"type": "text", "data": ...}) reaches the prompt as its
    text; it was replaced by "[document omitted: this model reads text only]". A PDF still is."""
    trace = tmp_path / "t.txt"
    with Server("--trace", trace) as s:
        s.anthropic().messages.create(model="m", max_tokens=1, thinking={"type": "disabled"}, messages=[
            {"role": "user", "content": [
                {"type": "document", "source": {"type": "text", "media_type": "text/plain", "data": "DOC-TEXT-42"}},
                {"type": "document", "source": {"type": "base64", "media_type": "application/pdf", "data": "JVBERg=="}},
                {"type": "text", "text": "Summarize."}]}])
    t = trace.read_text(errors="replace").split("--- rendered prompt")[1]
    assert "DOC-TEXT-42" in t and t.count("[document omitted") == 1, t[-1500:]


@pytest.mark.parametrize("path,body,word", [
    ("/v1/responses", {"input": "x", "text": "abc"}, "text must be an object"),
    ("/v1/responses", {"input": "x", "text": ["json"]}, "text must be an object"),
    ("/v1/responses", {"input": "x", "reasoning": {"summary": "bogus"}},
     "reasoning.summary must be auto, concise or detailed (got 'bogus')"),
    ("/v1/messages", {"max_tokens": 4, "messages": [{"role": "user", "content": "x"}], "top_k": 1.5},
     "top_k must be a whole number"),
    ("/v1/chat/completions", {"max_tokens": 4, "messages": [{"role": "user", "content": "x"}], "top_k": 0.5},
     "top_k must be a whole number"),
])
def test_wrong_typed_options_are_a_400_not_ignored(path, body, word):
    """Options of the wrong type or value were read as absent: `text: "abc"` dropped the text options, an unknown
    reasoning.summary left the summary out, top_k 1.5 ran as 1. Each is now a 400 that names it; the right forms
    (text object, summary auto, top_k 2.0 as a whole number) still serve."""
    with Server() as s:
        st, _, data = s.raw("POST", path, body)
        assert st == 400 and word in json.loads(data)["error"]["message"], (st, data)
        ok = {"/v1/responses": {"input": "x", "max_output_tokens": 4, "text": {"format": {"type": "text"}},
                                "reasoning": {"effort": "none", "summary": "auto"}},
              "/v1/messages": {"max_tokens": 4, "messages": [{"role": "user", "content": "x"}], "top_k": 2.0},
              "/v1/chat/completions": {"max_tokens": 4, "messages": [{"role": "user", "content": "x"}],
                                       "top_k": 2.0}}[path]
        st, _, data = s.raw("POST", path, ok)
        assert st == 200, data


def test_forced_call_closed_by_the_budget_leaves_no_tag_in_a_value():
    """A forced call the budget closes while the model is writing its closing tag: the tag begun is finished,
    not left in the value (an outside pass saw path "a.c</", "a.c</｜DSML｜" and a content ending in
    "</｜DSML｜parameter" at max_tokens 86-89 -- markup written into the user's file). EOS inside the tag: the
    same. The reasoning's "</think>" begun and then closed by the budget is finished likewise."""
    content = "abc def ghi jkl mno pqr stu"
    tool = {"type": "function", "function": {"name": "write_file", "parameters": WRITE}}
    with Server("--debug-reply", write_call(content), ctx=4096) as s:
        c = s.openai()
        seen = 0
        for mt in range(70, 112, 2):
            r = c.chat.completions.create(model="m", messages=user("x"), max_tokens=mt, tools=[tool],
                                          tool_choice="required", extra_body=NO_THINK)
            for tc in r.choices[0].message.tool_calls or []:
                a = json.loads(tc.function.arguments)
                seen += 1
                assert "a.c".startswith(a.get("path", "")) and content.startswith(a.get("content", "")), (mt, a)
        assert seen > 10
    # (a bare "</" then EOS stays text: "x </" of "x </b>" is as likely)
    for tail, value in (("</" + M, "hello"), ("</" + M + "param", "hello"), ("</", "hello</")):
        with Server("--debug-reply", write_call("hello" + tail, close=False), ctx=4096) as s:
            r = s.openai().chat.completions.create(model="m", messages=user("x"), max_tokens=400, tools=[tool],
                                                   tool_choice="required", extra_body=NO_THINK)
            assert r.choices[0].finish_reason == "tool_calls", (tail, r)
            assert json.loads(r.choices[0].message.tool_calls[0].function.arguments) == {
                "path": "a.c", "content": value}, tail
    # thinking: the reasoning's tag begun ("</think" as plain text), then EOS (the budget takes the same path)
    with Server("--debug-reply", "Plan: write it.</think", ctx=4096) as s:
        r = s.openai().chat.completions.create(model="m", messages=user("x"), max_tokens=400, tools=[tool],
                                               tool_choice="required")
        assert r.choices[0].message.model_extra.get("reasoning_content") == "Plan: write it.", r


def test_forced_call_the_model_completes_within_the_budget_is_not_reported_cut():
    """A forced call the model wrote whole, with room to spare, ends with tool_calls even when the budget had
    stopped offering its optional properties (the model did not want them): an outside pass saw
    {"command": "ls -la"} in 44 of 90 tokens reported as "length". Only a choice the budget actually changed
    makes the call "cut"."""
    tool = {"type": "function", "function": {"name": "bash", "parameters": {
        "type": "object", "properties": {"description": {"type": "string"}, "command": {"type": "string"}},
        "required": ["command"]}}}
    from test_server import dsml_call
    with Server("--debug-reply", dsml_call("bash", command="ls -la"), ctx=4096) as s:
        c = s.openai()
        whole = 0
        for mt in range(66, 104, 4):
            r = c.chat.completions.create(model="m", messages=user("x"), max_tokens=mt, tools=[tool],
                                          tool_choice="required", extra_body=NO_THINK)
            calls = r.choices[0].message.tool_calls or []
            if calls and json.loads(calls[0].function.arguments) == {"command": "ls -la"}:
                whole += 1
                assert r.choices[0].finish_reason == "tool_calls", (mt, r)
        assert whole >= 6, whole
    # a budget that does change the model's choice (it wanted the description first): cut
    with Server("--debug-reply", dsml_call("bash", description="list the files in the temporary folder",
                                           command="ls -la"), ctx=4096) as s:
        r = s.openai().chat.completions.create(model="m", messages=user("x"), max_tokens=60, tools=[tool],
                                               tool_choice="required", extra_body=NO_THINK)
        if r.choices[0].message.tool_calls:
            assert r.choices[0].finish_reason == "length", r


def test_responses_call_cut_by_the_budget_is_completed_and_can_be_sent_back():
    """Responses: a forced call the budget cut (status incomplete) lists its function_call item as completed
    in the reply and in the stream alike (the stream's output_item.done said completed, the reply incomplete),
    and the usual loop -- the output items sent back with the call's output -- is accepted (it was a 400)."""
    body = dict(model="m", input="write it", max_output_tokens=150, tool_choice="required",
                tools=[{"type": "function", "name": "write_file", "parameters": WRITE}],
                reasoning={"effort": "none"})
    with Server("--debug-reply", write_call(CODE), ctx=8192) as s:
        c = s.openai()
        r = c.responses.create(**body)
        assert r.status == "incomplete"
        calls = [o for o in r.output if o.type == "function_call"]
        assert len(calls) == 1 and calls[0].status == "completed", r.output
        events = list(c.responses.create(stream=True, **body))
        final = events[-1].response
        assert final.status == "incomplete"
        assert [o.status for o in final.output if o.type == "function_call"] == ["completed"]
        assert [(o.name, o.arguments) for o in final.output if o.type == "function_call"] == \
            [(calls[0].name, calls[0].arguments)]
        nxt = dict(body, input=[{"role": "user", "content": "write it"}] + [o.model_dump(exclude_none=True)
                                                                            for o in r.output] +
                   [{"type": "function_call_output", "call_id": calls[0].call_id, "output": "written"}])
        r2 = c.responses.create(**nxt)
        assert r2.status in ("completed", "incomplete"), r2


@pytest.mark.parametrize("which", ["optional_after", "markup_value"])
def test_forced_call_finish_says_whether_the_call_is_the_models(which):
    """Swept over max_tokens, a forced call ends with tool_calls exactly when its arguments are the ones the model
    wrote, and with length otherwise -- never a shortened call called complete (an outside pass saw {} and
    {"command": "ls -la"} without the description the model wrote, with tool_calls), and never a value that
    really holds "</" (HTML) cut silently at it, nor a whole call reported cut because the budget ran out just
    where the model began its own closing tag."""
    from test_server import dsml_call
    if which == "optional_after":
        schema = {"type": "object", "properties": {"description": {"type": "string"}, "command": {"type": "string"}},
                  "required": ["command"]}
        want = {"command": "ls -la", "description": "list files"}
        reply = dsml_call("bash", command="ls -la", description="list files")
        name = "bash"
    else:
        schema = WRITE
        want = {"path": "a.c", "content": "p q r s t u v w x </b> y z"}
        reply = write_call(want["content"])
        name = "write_file"
    tool = {"type": "function", "function": {"name": name, "parameters": schema}}
    with Server("--debug-reply", reply, ctx=4096) as s:
        c = s.openai()
        whole = cut = 0
        for mt in range(40, 131, 3):
            r = c.chat.completions.create(model="m", messages=user("x"), max_tokens=mt, tools=[tool],
                                          tool_choice="required", extra_body=NO_THINK)
            calls = r.choices[0].message.tool_calls or []
            args = json.loads(calls[0].function.arguments) if calls else None
            fin = r.choices[0].finish_reason
            assert (fin == "tool_calls") == (args == want), (mt, fin, args)
            for k, v in (args or {}).items():
                assert want[k].startswith(v), (mt, k, v)
            whole += fin == "tool_calls"
            cut += fin == "length"
        assert whole >= 5 and cut >= 5, (whole, cut)


TIGHT = {"type": "object",
         "properties": {"note": {"type": "string"}, "a_rather_long_property_name_one": {"type": "string"},
                        "count": {"type": "integer"}, "mode": {"enum": ["alpha", "beta"]}},
         "required": ["a_rather_long_property_name_one", "count", "mode"]}


@pytest.mark.parametrize("thinking", [False, True])
def test_forced_calls_at_tight_budgets_are_whole_or_absent(thinking):
    """Swept over small max_tokens, a forced call comes back with every required property (a string, an integer,
    an enum) or, when max_tokens cannot hold the shortest call, not at all and with finish "length"; once one
    comes back, every larger max_tokens gives one too. A call was "{}" with finish tool_calls at 26-44 tokens (the
    required properties dropped, the call called complete), and at some budgets above one that gave a call no
    call came (a property tag opened with too few tokens left to close it)."""
    tool = {"type": "function", "function": {"name": "some_tool_with_a_long_name", "parameters": TIGHT}}
    with Server(ctx=4096) as s:
        c = s.openai()
        first = None
        for mt in range(20, 161, 4):
            r = c.chat.completions.create(model="m", messages=user("x"), max_tokens=mt, tools=[tool],
                                          tool_choice="required", extra_body={} if thinking else NO_THINK, seed=1)
            calls = r.choices[0].message.tool_calls or []
            fin = r.choices[0].finish_reason
            if not calls:
                assert first is None and fin == "length", (mt, first, fin)
                continue
            first = first or mt
            args = json.loads(calls[0].function.arguments)
            assert set(TIGHT["required"]) <= set(args), (mt, fin, args)
            assert isinstance(args["count"], int) and args["mode"] in ("alpha", "beta"), (mt, args)
        assert first is not None, "no call up to max_tokens 160"


def test_responses_output_cut_by_max_output_tokens_can_be_sent_back():
    """A Responses turn cut by max_output_tokens has incomplete items (the reasoning, the message); clients that
    keep the conversation send the output back as it is (the SDKs' to_input_list() keeps the status): that is
    accepted (it was a 400 naming the status) and the next turn runs."""
    with Server() as s:
        c = s.openai()
        for reasoning in ({"effort": "none"}, {"effort": "high", "summary": "auto"}):
            r = c.responses.create(model="m", input="Tell me a story", max_output_tokens=12, reasoning=reasoning)
            assert r.status == "incomplete" and any(o.status == "incomplete" for o in r.output), r.output
            nxt = [{"role": "user", "content": "Tell me a story"}] + \
                [o.model_dump(exclude_none=True) for o in r.output] + [{"role": "user", "content": "go on"}]
            r2 = c.responses.create(model="m", input=nxt, max_output_tokens=12, reasoning=reasoning)
            assert r2.status in ("completed", "incomplete") and r2.usage.input_tokens > r.usage.input_tokens, r2


def test_chat_reply_of_calls_only_has_null_content():
    """A chat reply that is only tool calls has "content": null (OpenAI's shape; it was ""), a reply with text keeps
    its text; the stream and the plain reply agree."""
    from test_server import BASH_CALL
    with Server("--debug-reply", BASH_CALL) as s:
        body = {"model": "m", "messages": user("List the files"), "tools": [BASH_TOOL], "max_tokens": 200,
                "think": False}
        st, _, data = s.raw("POST", "/v1/chat/completions", body)
        msg = json.loads(data)["choices"][0]["message"]
        assert st == 200 and msg["tool_calls"] and msg["content"] is None, msg
        chunks = [c for _, c in sse(s.raw("POST", "/v1/chat/completions", dict(body, stream=True))[2]) if c]
        text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c.get("choices"))
        assert text == "", chunks
    with Server("--debug-reply", "Sure." + BASH_CALL) as s:
        st, _, data = s.raw("POST", "/v1/chat/completions", body)
        msg = json.loads(data)["choices"][0]["message"]
        assert msg["tool_calls"] and msg["content"] == "Sure.", msg
