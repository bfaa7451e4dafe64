"""Tool calls end to end: a scripted checkpoint (tests/scripted_model.py) whose greedy reply is a harmony
get_weather call, served as a second app; the official `openai` client and the gRPC stubs must see the
call as OpenAI `tool_calls` / gRPC tool-call deltas with finish reason tool_calls."""

from __future__ import annotations

import json

import grpc
import openai
import pytest

from serve.proto.gptoss.v1 import gptoss_pb2 as pb
from serve.proto.gptoss.v1 import gptoss_pb2_grpc as pb_grpc
from tests.conftest import SERVE_TEST_CONFIG
from tests.scripted_model import TOOL_CALL_ARGUMENTS, TOOL_CALL_COMPLETION, TOOL_CALL_NAME

WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Current weather of a city",
                                            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def scripted_app(serve_instance, scripted_checkpoint):
    from ray import serve

    from serve.app import build_app_from_config
    from serve.config import parse_config

    raw = {**SERVE_TEST_CONFIG, "model": {**SERVE_TEST_CONFIG["model"], "checkpoint": str(scripted_checkpoint),
                                          "name": "scripted"}}
    serve.run(build_app_from_config(parse_config(raw)), name="scripted", route_prefix="/scripted")
    yield serve_instance
    serve.delete("scripted")


@pytest.fixture(scope="module")
def client(scripted_app):
    return openai.OpenAI(base_url=f"{scripted_app.http}/scripted/v1", api_key="unused", max_retries=0, timeout=60)


@pytest.mark.parametrize("tool_choice", ["auto", "required", {"type": "function", "function": {"name": "get_weather"}}],
                         ids=["auto", "required", "named"])
def test_a_tool_call_comes_back_as_openai_tool_calls(client, tool_choice):
    reply = client.chat.completions.create(model="scripted", messages=ASK, tools=[WEATHER], tool_choice=tool_choice,
                                           max_tokens=40, temperature=0)
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    [call] = choice.message.tool_calls
    assert call.type == "function" and call.id.startswith("call_")
    assert (call.function.name, json.loads(call.function.arguments)) == (TOOL_CALL_NAME, json.loads(TOOL_CALL_ARGUMENTS))


def test_a_streamed_tool_call_starts_with_its_id_and_name_then_streams_its_arguments(client):
    deltas, finish = [], None
    for chunk in client.chat.completions.create(model="scripted", messages=ASK, tools=[WEATHER], max_tokens=40,
                                                temperature=0, stream=True):
        for choice in chunk.choices:
            deltas += choice.delta.tool_calls or []
            finish = choice.finish_reason or finish
    assert finish == "tool_calls"
    first, rest = deltas[0], deltas[1:]
    assert first.index == 0 and first.id.startswith("call_") and first.function.name == TOOL_CALL_NAME
    assert rest and all(d.index == 0 and d.id is None and d.function.name is None for d in rest)
    assert first.function.arguments + "".join(d.function.arguments for d in rest) == TOOL_CALL_ARGUMENTS


def test_the_tool_result_goes_back_in_the_next_turn(client):
    first = client.chat.completions.create(model="scripted", messages=ASK, tools=[WEATHER], max_tokens=40, temperature=0)
    call = first.choices[0].message.tool_calls[0]
    follow_up = ASK + [
        {"role": "assistant", "content": None, "tool_calls": [call.model_dump(exclude_none=True)]},
        {"role": "tool", "tool_call_id": call.id, "content": json.dumps({"temperature_c": 18})},
    ]
    second = client.chat.completions.create(model="scripted", messages=follow_up, tools=[WEATHER], max_tokens=40,
                                            temperature=0)
    # The history renders (the tool message is matched to its call); this model then calls again.
    assert second.usage.prompt_tokens > first.usage.prompt_tokens
    assert second.choices[0].finish_reason == "tool_calls"


def test_grpc_streams_the_same_tool_call(scripted_app):
    request = pb.GenerateRequest(
        model="scripted", sampling=pb.SamplingParams(max_tokens=40, temperature=0),
        chat=pb.Chat(messages=[pb.ChatMessage(role="user", content="What is the weather in Paris?")],
                     tools=[pb.Tool(name="get_weather", description="Current weather of a city",
                                    parameters_json=json.dumps(WEATHER["function"]["parameters"]))]))
    with grpc.insecure_channel(scripted_app.grpc) as channel:
        replies = list(pb_grpc.GptossServiceStub(channel).Generate(request, metadata=[("application", "scripted")],
                                                                   timeout=60))
    calls = [c for r in replies for c in r.tool_calls]
    assert calls[0].name == TOOL_CALL_NAME and calls[0].id.startswith("call_")
    assert "".join(c.arguments for c in calls) == TOOL_CALL_ARGUMENTS
    assert replies[-1].finish_reason == pb.FINISH_REASON_TOOL_CALLS
    assert replies[-1].usage.completion_tokens == sum(len(r.token_ids) for r in replies)


# --- the Responses API ---------------------------------------------------------------------------------

WEATHER_TOOL = {"type": "function", "name": "get_weather", "description": "Current weather of a city",
                "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}


def test_a_response_streams_its_function_call_arguments_as_they_are_generated(client):
    events = list(client.responses.create(model="scripted", input="What is the weather in Paris?",
                                          tools=[WEATHER_TOOL], max_output_tokens=40, temperature=0, stream=True))
    final = events[-1]
    assert final.type == "response.completed" and final.response.status == "completed"
    [call] = final.response.output
    assert call.type == "function_call" and call.call_id.startswith("call_") and call.name == TOOL_CALL_NAME
    assert json.loads(call.arguments) == json.loads(TOOL_CALL_ARGUMENTS)
    deltas = [e for e in events if e.type == "response.function_call_arguments.delta"]
    assert len(deltas) > 2 and "".join(d.delta for d in deltas) == call.arguments  # token by token, not batched
    done = [e for e in events if e.type == "response.function_call_arguments.done"]
    assert [(d.name, d.arguments) for d in done] == [(TOOL_CALL_NAME, call.arguments)]
    added = next(e for e in events if e.type == "response.output_item.added")
    assert added.item.call_id == call.call_id and added.item.arguments == ""
    assert final.response.usage.output_tokens == len(TOOL_CALL_COMPLETION)


@pytest.mark.parametrize("stored", [True, False], ids=["previous_response_id", "items-sent-back"])
def test_a_function_call_output_goes_back_and_the_model_answers_it(client, stored):
    first = client.responses.create(model="scripted", input="What is the weather in Paris?", tools=[WEATHER_TOOL],
                                    tool_choice={"type": "function", "name": "get_weather"}, max_output_tokens=40,
                                    temperature=0)
    [call] = first.output
    result = {"type": "function_call_output", "call_id": call.call_id, "output": json.dumps({"temperature_c": 18})}
    if stored:
        second = client.responses.create(model="scripted", previous_response_id=first.id, input=[result],
                                         tools=[WEATHER_TOOL], max_output_tokens=40, temperature=0)
    else:  # stateless: the client sends the conversation back, the model's own items as it got them
        history = [{"role": "user", "content": "What is the weather in Paris?"},
                   *[item.model_dump(exclude_none=True) for item in first.output], result]
        second = client.responses.create(model="scripted", input=history, tools=[WEATHER_TOOL],
                                         max_output_tokens=40, temperature=0, store=False)
    # the call and its result render into the prompt; this model's answer is another call
    assert second.usage.input_tokens > first.usage.input_tokens + len(TOOL_CALL_COMPLETION)
    assert second.status == "completed" and [item.type for item in second.output] == ["function_call"]
