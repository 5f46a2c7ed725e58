"""ds4-server driven by a third-party agent framework (pydantic-ai), through
its three model classes: OpenAI chat completions, OpenAI Responses and
Anthropic Messages. These are the round trips issue 12 found broken from
the outside: structured output is a forced tool call (tool_choice
"required" / {"type":"any"}, which Responses refused), usage is read from
each API's own fields, and streamed text must equal the plain reply.

The server runs with --default-thinking off, as a user matching these
clients would (they send no thinking control). Demo model: random weights,
so texts are meaningless; the checks are about shapes and agreement.
"""
import pytest
from pydantic import BaseModel

from test_server import Server

pydantic_ai = pytest.importorskip("pydantic_ai")


class City(BaseModel):
    name: str


def models(url):
    from pydantic_ai.models.anthropic import AnthropicModel
    from pydantic_ai.models.openai import OpenAIChatModel, OpenAIResponsesModel
    from pydantic_ai.providers.anthropic import AnthropicProvider
    from pydantic_ai.providers.openai import OpenAIProvider
    oa = OpenAIProvider(base_url=url + "/v1", api_key="none")
    return {"chat": OpenAIChatModel("deepseek-v4-flash", provider=oa),
            "responses": OpenAIResponsesModel("deepseek-v4-flash", provider=oa),
            "anthropic": AnthropicModel("deepseek-v4-flash",
                                        provider=AnthropicProvider(base_url=url, api_key="none"))}


SETTINGS = {"max_tokens": 12, "temperature": 0, "seed": 3}


@pytest.fixture(scope="module")
def server():
    with Server("--default-thinking", "off") as s:
        yield s


@pytest.mark.parametrize("kind", ["chat", "responses", "anthropic"])
def test_pydantic_ai_text_stream_and_usage(server, kind):
    from pydantic_ai import Agent
    agent = Agent(models(server.url)[kind], instructions="Be brief.")
    r = agent.run_sync("Say hello", model_settings=SETTINGS)
    assert isinstance(r.output, str) and r.output
    u = r.usage
    assert u.input_tokens > 5 and 0 < u.output_tokens <= 12
    with agent.run_stream_sync("Say hello", model_settings=SETTINGS) as st:
        streamed = "".join(st.stream_text(delta=True))
        su = st.usage
    assert streamed == r.output
    assert su.input_tokens == u.input_tokens and su.output_tokens == u.output_tokens


@pytest.mark.parametrize("kind", ["chat", "responses", "anthropic"])
def test_pydantic_ai_structured_output_is_a_forced_tool_call(server, kind):
    from pydantic_ai import Agent
    agent = Agent(models(server.url)[kind], output_type=City, retries=0)
    r = agent.run_sync("Name a city", model_settings=dict(SETTINGS, max_tokens=120))
    assert isinstance(r.output, City) and isinstance(r.output.name, str)
