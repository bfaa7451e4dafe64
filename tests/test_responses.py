"""The Responses API (`POST /v1/responses`) through the official `openai` client against the shared app:
whole and streamed responses agree, events come in OpenAI's order with rising sequence numbers, usage
is real, a conversation continues from stored responses with the prefix cache serving it, the store
answers retrieve / input_items / delete, and every malformed item is a 400 naming it. The gRPC
`Respond` gives the same events. Function calls are in tests/test_serve_tools.py (the scripted model), tenants and eviction in tests/test_auth.py."""

from __future__ import annotations

import asyncio

import grpc
import openai
import pytest
import requests

from gptoss.harmony import TextDelta
from gptoss.tokenizer import CALL_ID, CHANNEL_ID, MESSAGE_ID, START_ID, encode
from serve.admission import Generation
from serve.choices import ChoiceAssembler, ChoiceEvent, ChoiceUsage
from serve.model_protocol import ModelChunk
from serve.proto.gptoss.v1 import gptoss_pb2 as pb
from serve.proto.gptoss.v1 import gptoss_pb2_grpc as pb_grpc
from serve.responses_protocol import ResponseBuilder, ResponsesCall, items_to_messages


@pytest.fixture(scope="module")
def client(serve_app):
    return openai.OpenAI(base_url=f"{serve_app.http}/v1", api_key="unused", max_retries=0, timeout=60)


def item_texts(output) -> list[tuple[str, str]]:
    """(type, text) of each output item, ids aside."""
    texts = []
    for item in output:
        if item.type == "function_call":
            texts.append((item.type, item.name + item.arguments))
        else:
            texts.append((item.type, "".join(part.text for part in item.content or ())))
    return texts


def test_a_streamed_response_matches_the_whole_one_event_by_event(client):
    ask = {"model": "tiny-test", "input": "Write one line about the sea.", "max_output_tokens": 24, "temperature": 0}
    whole = client.responses.create(**ask)
    assert whole.id.startswith("resp_") and whole.object == "response"
    events = list(client.responses.create(**ask, stream=True))
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert [e.type for e in events[:2]] == ["response.created", "response.in_progress"]
    final = events[-1].response
    assert events[-1].type == f"response.{final.status}" and final.status in ("completed", "incomplete")
    # greedy in float32: the same tokens, so the same items; usage counted once
    assert item_texts(final.output) == item_texts(whole.output)
    assert final.usage.output_tokens == whole.usage.output_tokens
    assert final.usage.input_tokens == whole.usage.input_tokens
    # each item: added, its deltas (which add up to its text), done, in output order
    for index, item in enumerate(final.output):
        mine = [e for e in events if getattr(e, "output_index", None) == index]
        assert mine[0].type == "response.output_item.added" and mine[-1].type == "response.output_item.done"
        deltas = "".join(e.delta for e in mine if e.type.endswith(".delta"))
        assert (item.arguments if item.type == "function_call" else item.content[0].text) == deltas
    assert final.usage.output_tokens_details.reasoning_tokens <= final.usage.output_tokens
    assert final.usage.total_tokens == final.usage.input_tokens + final.usage.output_tokens


def test_the_output_budget_ending_a_response_makes_it_incomplete(client):
    response = client.responses.create(model="tiny-test", input="Count to one hundred.", max_output_tokens=5,
                                       temperature=0)
    assert response.status == "incomplete" and response.incomplete_details.reason == "max_output_tokens"
    assert response.usage.output_tokens == 5
    assert all(item.status == "incomplete" for item in response.output[-1:])


def test_three_turns_continue_from_stored_responses_and_the_cache_serves_more_each_turn(client):
    first = client.responses.create(model="tiny-test", input="My name is Ada.", max_output_tokens=8, temperature=0)
    second = client.responses.create(model="tiny-test", input="What is my name?", previous_response_id=first.id,
                                     max_output_tokens=8, temperature=0)
    third = client.responses.create(model="tiny-test", input="Say it again.", previous_response_id=second.id,
                                    max_output_tokens=8, temperature=0)
    assert second.previous_response_id == first.id
    assert first.usage.input_tokens < second.usage.input_tokens < third.usage.input_tokens
    cached = [r.usage.input_tokens_details.cached_tokens for r in (second, third)]
    assert 0 < cached[0] < cached[1], cached


def test_a_stored_response_can_be_retrieved_listed_and_deleted(client):
    created = client.responses.create(model="tiny-test", instructions="Answer briefly.", max_output_tokens=4,
                                      input=[{"role": "user", "content": "Hello"},
                                             {"role": "assistant", "content": "Hi."},
                                             {"role": "user", "content": [{"type": "input_text", "text": "And?"}]}],
                                      metadata={"ticket": "42"}, temperature=0)
    again = client.responses.retrieve(created.id)
    assert again.model_dump() == created.model_dump()
    assert again.instructions == "Answer briefly." and again.metadata == {"ticket": "42"}
    items = client.responses.input_items.list(created.id, order="asc")
    assert [(i.role, i.content[0].text) for i in items.data] == [("user", "Hello"), ("assistant", "Hi."),
                                                                ("user", "And?")]
    page = client.responses.input_items.list(created.id, limit=2)  # newest first by default
    assert [i.content[0].text for i in page.data] == ["And?", "Hi."] and page.has_more
    client.responses.delete(created.id)
    with pytest.raises(openai.NotFoundError, match=created.id):
        client.responses.retrieve(created.id)
    not_stored = client.responses.create(model="tiny-test", input="x", max_output_tokens=2, store=False)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(not_stored.id)
    with pytest.raises(openai.NotFoundError, match="previous_response_id"):
        client.responses.create(model="tiny-test", input="x", previous_response_id="resp_unknown")


CALL = {"type": "function_call", "call_id": "call_1", "name": "get_weather", "arguments": "{}"}


@pytest.mark.parametrize(("body", "param"), [
    ({"input": [{"role": "user", "content": "a"}, {"type": "message", "role": "user"}]}, "input.1.content"),
    ({"input": [{"role": "critic", "content": "a"}]}, "input.0.role"),
    ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]}, "input.0.content.0.type"),
    ({"input": [{"role": "user", "content": "a"}, {"type": "function_call", "name": "f", "arguments": "{}"}]},
     "input.1.call_id"),
    ({"input": [{"role": "user", "content": "a"}, dict(CALL, name="no spaces")]}, "input.1"),
    ({"input": [CALL, {"type": "function_call_output", "call_id": "call_2", "output": "1"}]}, "input.1.call_id"),
    ({"input": [CALL, {"type": "function_call_output", "call_id": "call_1"}]}, "input.1.output"),
    ({"input": [{"type": "reasoning", "summary": [], "encrypted_content": "gAAA"}]}, "input.0.encrypted_content"),
    ({"input": [{"type": "web_search_call", "id": "ws_1"}]}, "input.0.type"),
    ({"input": "a", "tools": [{"type": "web_search"}]}, "tools.0.type"),
    ({"input": "a", "tools": [{"type": "function", "name": "f", "parameters": []}]}, "tools.0.parameters"),
    ({"input": "a", "include": ["reasoning.encrypted_content"]}, "include.0"),
    ({"input": "a", "truncation": "auto"}, "truncation"),
    ({"input": "a", "max_output_tokens": 10**6}, "max_output_tokens"),
    ({"input": []}, "input"),
    ({"input": "a", "tool_choice": "required"}, "tool_choice"),
], ids=lambda value: value if isinstance(value, str) else None)
def test_a_malformed_request_is_a_400_naming_the_item_and_field(serve_app, body, param):
    response = requests.post(f"{serve_app.http}/v1/responses", json={"model": "tiny-test", **body}, timeout=60)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param and param in error["message"], error


def test_broken_harmony_from_the_model_ends_the_response_without_a_crash():
    """Tokens that break harmony's grammar (possible when sampling): the parser drops them and resyncs at
    the next <|start|>; the response still ends with its final event and what parsed stands."""
    call = ResponsesCall("resp_test", (), None, {}, None, True, False, None)  # only its id and echo are read
    generation = Generation("r", (1, 2, 3), None)
    assembler, builder = ChoiceAssembler(0, generation), ResponseBuilder(call, "m", 16)
    broken = [*encode("x"), MESSAGE_ID, CALL_ID, START_ID, MESSAGE_ID, *encode("y"),  # a call to "x", a role-less header
              START_ID, *encode("assistant"), CHANNEL_ID, *encode("final"), MESSAGE_ID, *encode("ok")]
    events = builder.start()
    for i, token in enumerate(broken):
        last = i == len(broken) - 1
        chunk = ModelChunk((token,), None, "length" if last else None, 3, i + 1, 0)
        events += builder.add(assembler.add(chunk))
    assert events[-1]["type"] == "response.incomplete"
    assert assembler.parser.num_skipped_tokens > 0
    assert [(item["type"], item["status"]) for item in builder.response["output"]] == [
        ("function_call", "completed"), ("message", "incomplete")]
    assert builder.response["output"][-1]["content"][0]["text"] == "ok"
    assert [e["sequence_number"] for e in events] == list(range(len(events)))


# --- the same over gRPC --------------------------------------------------------------------------------

def test_grpc_respond_streams_the_events_http_streams_and_the_store_answers_it(serve_app, client):
    request = pb.RespondRequest(model="tiny-test", input=[pb.Item(message=pb.MessageItem(role="user", text="Hi"))],
                                instructions="Be brief.", max_output_tokens=12, temperature=0, metadata={"k": "v"})
    with grpc.insecure_channel(serve_app.grpc) as channel:
        stub = pb_grpc.GptossServiceStub(channel)
        events = list(stub.Respond(request, timeout=60))
        http_events = list(client.responses.create(model="tiny-test", input="Hi", instructions="Be brief.",
                                                   max_output_tokens=12, temperature=0, stream=True))
        assert [e.type for e in events] == [e.type for e in http_events]
        assert [e.sequence_number for e in events] == list(range(len(events)))
        assert [e.delta for e in events] == [getattr(e, "delta", "") for e in http_events]
        final = events[-1].response
        assert final.status == http_events[-1].response.status and final.metadata == {"k": "v"}
        assert final.usage.output_tokens == http_events[-1].response.usage.output_tokens
        stored = stub.GetResponse(pb.GetResponseRequest(response_id=final.id), timeout=30)
        assert [i.message.text for i in stored.input_items] == ["Hi"] and stored.output == final.output
        follow = list(stub.Respond(pb.RespondRequest(input=[pb.Item(message=pb.MessageItem(role="user", text="More"))],
                                                     previous_response_id=final.id, max_output_tokens=4,
                                                     temperature=0), timeout=60))[-1].response
        assert follow.previous_response_id == final.id and follow.usage.cached_tokens > 0
        assert stub.DeleteResponse(pb.DeleteResponseRequest(response_id=final.id), timeout=30).deleted
        with pytest.raises(grpc.RpcError) as error:
            stub.GetResponse(pb.GetResponseRequest(response_id=final.id), timeout=30)
        assert error.value.code() == grpc.StatusCode.NOT_FOUND and final.id in error.value.details()
        bad = pb.RespondRequest(input=[pb.Item(message=pb.MessageItem(role="user", text="a")),
                                       pb.Item(function_call_output=pb.FunctionCallOutputItem(call_id="c", output="1"))])
        with pytest.raises(grpc.RpcError) as error:
            list(stub.Respond(bad, timeout=30))
        assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "input[1].call_id" in error.value.details()


def test_the_store_evicts_the_least_recently_used_by_entries_and_by_bytes():
    from serve.response_store import ResponseStore

    store = ResponseStore(max_entries=3, max_bytes=100)
    loop = asyncio.new_event_loop()
    put, get, delete, stats = (lambda *a, m=m: loop.run_until_complete(getattr(store, m)(*a))
                               for m in ("put", "get", "delete", "stats"))
    for name in "abc":
        assert put(name, "t", b"x" * 20)
    assert get("a", "t") == b"x" * 20  # now the most recently used
    assert get("a", "other") is None and not delete("a", "other")  # another tenant's: not there
    put("d", "t", b"y" * 20)  # a fourth entry: b (least recently used) goes
    assert get("b", "t") is None and get("c", "t") is not None  # c is now the most recent
    put("e", "t", b"z" * 70)  # 130 bytes with a, d, c: the least recently used go until <= 100
    assert [get(k, "t") is not None for k in "acde"] == [False, True, False, True]
    assert stats() == {"entries": 2, "bytes": 90, "evicted": 3}
    assert not put("f", "t", b"w" * 101)  # larger than the store: refused, nothing evicted for it
    assert stats()["entries"] == 2
    assert delete("c", "t") and stats() == {"entries": 1, "bytes": 70, "evicted": 3}
    loop.close()


def test_a_preamble_and_an_answer_are_told_apart_by_phase_and_rendered_back_on_their_channels():
    call = ResponsesCall("resp_test", (), None, {}, None, True, False, None)
    builder = ResponseBuilder(call, "m", 16)
    builder.add(ChoiceEvent(0, (1,), (TextDelta("commentary", "Let me look."),), ()))
    builder.add(ChoiceEvent(0, (1,), (TextDelta("final", "It is 18 C."),), (), "stop", ChoiceUsage(5, 9, 0, 0)))
    output = builder.response["output"]
    assert [(item["phase"], item["content"][0]["text"]) for item in output] == [
        ("commentary", "Let me look."), ("final_answer", "It is 18 C.")]
    messages, _ = items_to_messages(tuple(output))
    assert [(m.role, m.channel, m.content) for m in messages] == [
        ("assistant", "commentary", "Let me look."), ("assistant", None, "It is 18 C.")]


def test_an_aborted_stream_ends_the_response_as_failed_keeping_its_counts():
    call = ResponsesCall("resp_test", (), None, {}, None, True, False, None)
    builder = ResponseBuilder(call, "m", 16)
    builder.add(ChoiceEvent(0, (1, 2), (TextDelta("final", "Hal"),), (), None, ChoiceUsage(5, 2, 0, 0)))
    events = builder.add(ChoiceEvent(0, (), (), (), "abort", ChoiceUsage(5, 0, 0, 0)))
    assert [e["type"] for e in events][-2:] == ["response.output_item.done", "response.failed"]
    assert events[-2]["item"]["status"] == "incomplete"
    response = events[-1]["response"]
    assert response["status"] == "failed" and response["error"]["code"] == "server_error"
    assert response["usage"]["output_tokens"] == 2
