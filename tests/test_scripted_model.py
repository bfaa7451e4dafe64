"""The scripted checkpoint (tests/scripted_model.py): a real-layout model whose greedy reply is a fixed
harmony tool call, checked through the real loader, engine, tokenizer and parser (no Ray)."""

from __future__ import annotations

import json

import pytest
import torch
from openai_harmony import Message, Role
from safetensors import safe_open

import gptoss
from engine import Engine, EngineConfig, SamplingParams
from gptoss.checkpoint import HF_INDEX
from gptoss.harmony import (
    ChatMessage,
    FunctionTool,
    ParsedToolCall,
    parse_completion,
    render_prompt,
    tool_call_prefill,
)
from gptoss.tokenizer import CALL_ID, get_encoding
from tests.scripted_model import (
    ASSISTANT_ID,
    TOOL_CALL_ARGUMENTS,
    TOOL_CALL_COMPLETION,
    TOOL_CALL_NAME,
    TOOL_CALL_SCRIPT,
    write_scripted_checkpoint,
)

WEATHER = FunctionTool(TOOL_CALL_NAME, "Weather of a city",
                       {"type": "object", "properties": {"city": {"type": "string"}}})
PREFILLS = {"named": tool_call_prefill(TOOL_CALL_NAME), "any": tool_call_prefill(None)}


def weather_prompt() -> list[int]:
    return render_prompt([ChatMessage("user", "Weather in Paris?")], tools=[WEATHER])


def shard_headers(path) -> dict[str, tuple[str, tuple[int, ...]]]:
    """Checkpoint tensor name -> (safetensors dtype, shape), over all shards."""
    index = json.loads((path / HF_INDEX).read_text())
    out = {}
    for shard in sorted(set(index["weight_map"].values())):
        with safe_open(path / shard, "np") as f:
            for name in f.keys():
                s = f.get_slice(name)
                out[name] = (s.get_dtype(), tuple(s.get_shape()))
    return out


def test_tool_call_completion_is_what_harmony_renders_after_start_assistant():
    message = (Message.from_role_and_content(Role.ASSISTANT, TOOL_CALL_ARGUMENTS).with_channel("commentary")
               .with_recipient(f"functions.{TOOL_CALL_NAME}").with_content_type("<|constrain|>json"))
    rendered = get_encoding().render(message)
    assert rendered[1] == ASSISTANT_ID and weather_prompt()[-1] == ASSISTANT_ID
    assert tuple(rendered[2:]) == TOOL_CALL_COMPLETION
    # No token repeats, so the chain is a function and every token has one successor.
    chain = (ASSISTANT_ID, *TOOL_CALL_COMPLETION)
    assert len(set(chain)) == len(chain) and len(TOOL_CALL_SCRIPT) == len(chain) - 1


@pytest.mark.parametrize("prefill", list(PREFILLS.values()), ids=list(PREFILLS))
def test_tool_call_prefills_are_prefixes_of_the_scripted_tool_call(prefill):
    assert tuple(prefill) == TOOL_CALL_COMPLETION[:len(prefill)]


def test_scripted_checkpoint_keeps_the_release_layout_of_the_random_one(scripted_checkpoint, tiny_checkpoint):
    assert shard_headers(scripted_checkpoint) == shard_headers(tiny_checkpoint)
    assert (json.loads((scripted_checkpoint / "config.json").read_text())
            == json.loads((tiny_checkpoint / "config.json").read_text()))


def test_scripted_model_gives_the_successor_a_large_logit_and_every_other_token_zero(scripted_checkpoint):
    model = gptoss.load_model(scripted_checkpoint, dtype=torch.float32, packed_experts=False)
    unscripted = 1000
    tokens = [unscripted, *TOOL_CALL_SCRIPT]
    logits = model(torch.tensor(tokens))  # [T, vocab]
    expected = torch.zeros_like(logits)
    for row, token in enumerate(tokens[1:], start=1):
        expected[row, TOOL_CALL_SCRIPT[token]] = 32.0  # 4 * sqrt(64), less a hair for the norm's eps
    # The successor within 0.1%, every other logit exactly 0.
    torch.testing.assert_close(logits, expected, atol=0, rtol=1e-3)


@pytest.mark.parametrize("packed", [False, True], ids=["dequantized", "packed"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_engine_greedily_writes_the_scripted_tool_call_from_the_prompt_and_from_each_prefill(
        scripted_checkpoint, dtype, packed):
    model = gptoss.load_model(scripted_checkpoint, dtype=dtype, packed_experts=packed)
    prompt = weather_prompt()
    prefills = [[], *PREFILLS.values()]
    completions = Engine(model, EngineConfig(num_kv_blocks=64)).generate(
        [prompt + p for p in prefills], SamplingParams.greedy(max_tokens=40))
    for prefill, completion in zip(prefills, completions, strict=True):
        assert completion.token_ids == TOOL_CALL_COMPLETION[len(prefill):]
        assert completion.token_ids[-1] == CALL_ID and completion.finish_reason == "stop"
        parsed = parse_completion(prefill + list(completion.token_ids))
        assert parsed.tool_calls == (
            ParsedToolCall(f"functions.{TOOL_CALL_NAME}", TOOL_CALL_NAME, TOOL_CALL_ARGUMENTS),)
        assert not parsed.truncated and parsed.final == "" and parsed.analysis == ""


def test_write_scripted_checkpoint_refuses_more_tokens_than_hidden_directions(tmp_path):
    with pytest.raises(ValueError, match="at most 64 keys"):
        write_scripted_checkpoint(tmp_path, {t: 0 for t in range(65)})
    with pytest.raises(ValueError, match="token ids in"):
        write_scripted_checkpoint(tmp_path, {1: 201088})
