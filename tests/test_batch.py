"""Batch inference on Ray Data (serve/batch.py): rows rendered and parsed as the online APIs do, bad rows
become error rows, results equal the bare engine's, tool calls come back parsed, and the CLI resumes
after being killed part-way without losing or repeating a row."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import gptoss
from engine import Engine, EngineConfig, SamplingParams
from gptoss.harmony import ChatMessage
from gptoss.tokenizer import START_ID, encode
from serve.admission import ToolChoice, render_chat
from serve.batch import RESULT_COLUMNS, parse_row, render_row
from tests.scripted_model import TOOL_CALL_ARGUMENTS, TOOL_CALL_COMPLETION, TOOL_CALL_NAME

WEATHER_TOOL = {"type": "function", "function": {"name": TOOL_CALL_NAME, "description": "Weather in a city",
                                                 "parameters": {"type": "object",
                                                                "properties": {"city": {"type": "string"}}}}}


# --- rows (no Ray) -----------------------------------------------------------------------------------


def test_a_chat_row_renders_as_the_chat_api_renders_it():
    row = {"id": 7, "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
           "reasoning_effort": "low", "temperature": 0.5, "max_tokens": 9, "stop": ["\n\n"], "tools": None}
    rendered = render_row(row)
    assert rendered["error"] == "" and rendered["id"] == "7"
    prompt, _ = render_chat([ChatMessage("system", "Be brief."), ChatMessage("user", "Hi")], [], ToolChoice("none"),
                            "low", time.strftime("%Y-%m-%d", time.gmtime()))  # the date, as online chats render it
    assert rendered["prompt_token_ids"] == list(prompt)
    sampling = json.loads(rendered["sampling"])
    assert (sampling["temperature"], sampling["max_tokens"]) == (0.5, 9)
    assert rendered["harmony"] and rendered["stop"] == ["\n\n"]


def test_a_responses_row_renders_as_the_equal_chat_row():
    responses = render_row({"id": 1, "instructions": "Be brief.", "input": [{"role": "user", "content": "Hi"}],
                            "reasoning": {"effort": "low"}, "max_output_tokens": 9, "tools": [dict(
                                WEATHER_TOOL["function"], type="function")], "tool_choice": "required"})
    chat = render_row({"id": 1, "messages": [{"role": "developer", "content": "Be brief."},
                                             {"role": "user", "content": "Hi"}],
                       "reasoning_effort": "low", "max_tokens": 9, "tools": [WEATHER_TOOL], "tool_choice": "required"})
    assert responses["error"] == chat["error"] == ""
    assert responses == chat


def test_token_id_rows_are_parsed_as_harmony_only_when_they_end_a_rendered_conversation():
    tail = [START_ID, *encode("assistant")]
    harmony = render_row({"id": "a", "prompt_token_ids": [1, 2, 3, *tail], "max_tokens": 4})
    plain = render_row({"id": "b", "prompt_token_ids": [1, 2, 3], "seed": 3})
    assert harmony["error"] == plain["error"] == ""
    assert harmony["harmony"] and not plain["harmony"]
    assert json.loads(plain["sampling"])["seed"] == 3 and json.loads(plain["sampling"])["max_tokens"] is None


@pytest.mark.parametrize(("row", "named"), [
    ({"messages": [{"role": "user", "content": "x"}]}, "id"),
    ({"id": "r", "messages": [{"role": "wizard", "content": "x"}]}, "messages.0.role"),
    ({"id": "r", "messages": [{"role": "user", "content": "x"}], "temperature": "hot"}, "temperature"),
    ({"id": "r", "messages": [{"role": "user", "content": "x"}], "n": 2}, "n"),
    ({"id": "r", "prompt_token_ids": [1, 2], "colour": "blue"}, "colour"),
    ({"id": "r", "prompt_token_ids": ["a", "b"]}, "prompt"),
    ({"id": "r", "text": "hello"}, "messages"),
    ({"id": "r", "messages": [{"role": "user", "content": "x"}], "tool_choice": "required"}, "tool_choice"),
    ({"id": "r", "input": [{"type": "function_call_output", "call_id": "c", "output": "1"}]}, "input.0.call_id"),
    ({"id": "r", "input": "x", "previous_response_id": "resp_1"}, "previous_response_id"),
], ids=["no-id", "unknown-role", "wrong-type", "n-choices", "unknown-field", "ids-not-ints", "no-input",
        "required-without-tools", "responses-unanswered-call", "responses-continuing"])
def test_a_bad_row_becomes_an_error_row_naming_the_field(row, named):
    rendered = render_row(row)
    assert named in rendered["error"], rendered["error"]
    result = parse_row(rendered | {"completion_token_ids": [], "finish_reason": "", "num_prompt_tokens": 0,
                                   "num_cached_tokens": 0})
    assert set(result) == set(RESULT_COLUMNS) and result["error"] == rendered["error"]


def test_a_generated_tool_call_is_parsed_into_openai_tool_calls():
    rendered = render_row({"id": "t", "messages": [{"role": "user", "content": "Weather in Paris?"}],
                           "tools": [WEATHER_TOOL]})
    result = parse_row(rendered | {"completion_token_ids": list(TOOL_CALL_COMPLETION), "finish_reason": "stop",
                                   "num_prompt_tokens": len(rendered["prompt_token_ids"]), "num_cached_tokens": 0})
    [call] = json.loads(result["tool_calls"])
    assert call["function"] == {"name": TOOL_CALL_NAME, "arguments": TOOL_CALL_ARGUMENTS}
    assert result["finish_reason"] == "tool_calls" and result["completion_tokens"] == len(TOOL_CALL_COMPLETION)


# --- on Ray Data ------------------------------------------------------------------------------------


def wait_until(predicate, what: str, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def batch_config(checkpoint, **batch):
    from serve.config import parse_config

    return parse_config({"model": {"checkpoint": str(checkpoint), "dtype": "float32", "packed_experts": False},
                         "group": {"num_ranks": 1, "device": "cpu"},
                         "engine": {"max_num_seqs": 8, "max_num_batched_tokens": 256, "kv_cache_gib": 0.02},
                         "batch": {"rows_per_batch": 4, "num_cpus_per_actor": 0.1, **batch}})


# Malformed token-id rows (one schema, so Ray Data takes them in one dataset), each with the field its
# error must name.
BAD_ROWS = {
    "cold": ({"temperature": -1.0}, "temperature"),
    "huge": ({"max_tokens": 10**7}, "max_tokens"),  # refused by the engine: beyond the context
    "zero-tokens": ({"max_tokens": 0}, "max_tokens"),
    "wide-top-p": ({"top_p": 1.5}, "top_p"),
    "negative-top-k": ({"top_k": -3}, "top_k"),
    "empty-prompt": ({"prompt_token_ids": []}, "prompt"),
    "id-past-vocab": ({"prompt_token_ids": [1, 10**6]}, "prompt"),
    "negative-id": ({"prompt_token_ids": [-5, 3]}, "prompt"),
}


def test_batch_generate_equals_the_bare_engine_and_keeps_bad_rows_as_errors(ray_cluster, tiny_checkpoint):
    import ray
    import ray.data

    from serve.batch import batch_generate, release_batch_groups

    gen = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, 199998, (int(n),), generator=gen).tolist() for n in torch.randint(3, 40, (184,))]
    rows = [{"id": f"p{i}", "prompt_token_ids": p, "max_tokens": 6, "temperature": 0.0, "top_p": 1.0, "top_k": 0}
            for i, p in enumerate(prompts)]
    good = rows[0]
    for i, (name, (fields, _)) in enumerate(BAD_ROWS.items()):  # spread among the good rows, twice each
        for copy in range(2):
            rows.insert(11 * i + 97 * copy, {**good, "id": f"{name}-{copy}", **fields})
    cpus_before = ray.available_resources().get("CPU", 0)
    results = batch_generate(ray.data.from_items(rows), batch_config(tiny_checkpoint, num_groups=2),
                             run_name="equal").take_all()
    assert release_batch_groups("equal") == 2  # both groups' placement groups, freed once the results are in
    wait_until(lambda: ray.available_resources().get("CPU", 0) >= cpus_before, "the pool's resources back")
    assert sorted(r["id"] for r in results) == sorted(r["id"] for r in rows)  # every id exactly once
    by_id = {r["id"]: r for r in results}
    engine = Engine(gptoss.load_model(tiny_checkpoint, dtype=torch.float32), EngineConfig(num_kv_blocks=512))
    expected = [list(c.token_ids) for c in engine.generate(prompts, SamplingParams.greedy(max_tokens=6))]
    for i, tokens in enumerate(expected):
        r = by_id[f"p{i}"]
        assert r["error"] == "" and list(r["completion_token_ids"]) == tokens, r
        assert r["completion_tokens"] == 6 and r["prompt_tokens"] == len(prompts[i]) and r["finish_reason"] == "length"
    for name, (_, field) in BAD_ROWS.items():
        for copy in range(2):
            r = by_id[f"{name}-{copy}"]
            assert field in r["error"] and r["completion_tokens"] == 0, (name, r["error"])


def test_chat_rows_with_tools_come_back_as_parsed_tool_calls(ray_cluster, scripted_checkpoint, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from serve.batch import batch_generate, read_input, release_batch_groups

    rows = [{"id": f"c{i}", "messages": [{"role": "user", "content": f"Weather in city {i}?"}],
             "tools": [WEATHER_TOOL], "temperature": 0.0, "max_tokens": 64} for i in range(5)]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "rows.parquet")  # Parquet input, null-free
    source, is_jsonl = read_input(str(tmp_path / "rows.parquet"))
    assert not is_jsonl
    results = batch_generate(source, batch_config(scripted_checkpoint), run_name="tools").take_all()
    release_batch_groups("tools")
    assert sorted(r["id"] for r in results) == [f"c{i}" for i in range(5)]
    for r in results:
        [call] = json.loads(r["tool_calls"])
        assert call["function"] == {"name": TOOL_CALL_NAME, "arguments": TOOL_CALL_ARGUMENTS}, r
        assert r["finish_reason"] == "tool_calls" and r["error"] == ""


# --- the CLI: killed part-way, then resumed ---------------------------------------------------------


def run_cli(tmp_path, *args: str) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # its own Ray instance
    return subprocess.Popen([sys.executable, "-m", "serve.cli", "batch", *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)


def written_ids(out) -> list[str]:
    return [json.loads(line)["id"] for part in sorted(out.glob("part-*.jsonl")) for line in part.read_text().splitlines()]


def test_a_batch_job_killed_part_way_resumes_without_losing_or_repeating_a_row(tmp_path, tiny_checkpoint):
    # The first block of rows (serve/batch.py splits the 56 into two of 28) is quick, the rest slow (25
    # rows of 400 tokens, 8 at a time): the kill lands after the first parts are written and long
    # before the end, however the machine is loaded and whenever Ray Data hands the first block back.
    rows = [{"id": f"row-{i}", "prompt_token_ids": [100 + i, 200 + i, 300 + i], "max_tokens": 8 if i < 27 else 400,
             "temperature": 0} for i in range(55)]
    rows.insert(20, {"id": "broken", "messages": "not a list"})
    (tmp_path / "in.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "cfg.yaml").write_text(f"model: {{checkpoint: {tiny_checkpoint}, dtype: float32}}\n"
                                       "group: {device: cpu}\nengine: {kv_cache_gib: 0.02, max_num_seqs: 8, "
                                       "max_num_batched_tokens: 256}\nbatch: {rows_per_batch: 4}\n")
    out = tmp_path / "out"
    args = ("--config", str(tmp_path / "cfg.yaml"), "--input", str(tmp_path / "in.jsonl"), "--output", str(out),
            "--rows-per-part", "4")
    first = run_cli(tmp_path, *args)
    try:
        deadline = time.monotonic() + 240
        while not list(out.glob("part-*.jsonl")):  # a part written, the job still running
            assert first.poll() is None, first.stdout.read()
            assert time.monotonic() < deadline, "no parts written"
            time.sleep(0.2)
        os.killpg(first.pid, signal.SIGKILL)
        first.wait(30)
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
    done_first = written_ids(out)
    assert 0 < len(done_first) < len(rows)

    second = run_cli(tmp_path, *args)
    output, _ = second.communicate(timeout=300)
    assert second.returncode == 0, output
    assert f"{len(done_first)} already in" in output and "rows (" in output  # it resumed, with progress
    ids = written_ids(out)
    assert sorted(ids) == sorted(r["id"] for r in rows)  # every row exactly once
    results = {json.loads(line)["id"]: json.loads(line) for part in out.glob("part-*.jsonl")
               for line in part.read_text().splitlines()}
    assert "messages" in results["broken"]["error"]
    wanted = {r["id"]: r.get("max_tokens") for r in rows}
    # Every row complete: run to its max_tokens, or to a stop token (random weights may sample one).
    short = {rid: (r["completion_tokens"], r["finish_reason"], r["error"]) for rid, r in results.items()
             if rid != "broken" and not (r["finish_reason"] == "length" and r["completion_tokens"] == wanted[rid]
                                         or r["finish_reason"] == "stop" and r["completion_tokens"] <= wanted[rid])}
    assert not short, short
