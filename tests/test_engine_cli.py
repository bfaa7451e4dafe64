"""`gptoss-serve generate` on the engine: one chat turn, and `--batch-file` with many prompts at once."""

from __future__ import annotations

import json
import re

import pytest
import torch

from serve import cli
from tests.engine_helpers import reference_greedy


def test_batch_file_runs_every_prompt_and_prints_one_result_per_line_and_the_throughput(tiny_checkpoint, tiny_model,
                                                                                        tmp_path, capsys):
    raw = [5, 17, 42, 1000, 7]
    batch = tmp_path / "prompts.jsonl"
    batch.write_text("\n".join(json.dumps(line) for line in [
        {"id": "capital", "prompt": "What is the capital of France?"},
        {"prompt": "Tell me a joke", "system": "Be brief", "max_tokens": 3, "temperature": 0.8, "seed": 1},
        {"id": "raw", "prompt_token_ids": raw, "max_tokens": 6},
    ]) + "\n\n")
    code = cli.main(["generate", "--checkpoint", str(tiny_checkpoint), "--batch-file", str(batch),
                     "--max-tokens", "5", "--dtype", "float32", "--show-analysis"])
    out, err = capsys.readouterr()
    assert code == 0, err
    records = [json.loads(line) for line in out.splitlines()]
    assert [r["id"] for r in records] == ["capital", "line-2", "raw"]
    assert [r["completion_tokens"] for r in records] == [5, 3, 6]
    assert all(r["finish_reason"] == "length" and "analysis" in r for r in records)
    with torch.inference_mode():
        assert records[2]["token_ids"] == reference_greedy(tiny_model, raw, 6)
    assert "3 prompts" in err and "14 tokens generated" in err and "tokens/s" in err


@pytest.mark.parametrize("line, message", [
    ({"prompt": "hi", "prompt_token_ids": [1]}, "line 2: line: Value error, give exactly one of"),
    ({"prompt": "hi", "tempreature": 0.5}, "line 2: tempreature: Extra inputs are not permitted"),
    ({"prompt": "hi", "top_p": 0.0}, r"line 2 \(id 'line-2'\): top_p must be in \(0, 1\]"),
    ({"prompt_token_ids": [1, 201088]}, r"line 2 \(id 'line-2'\): prompt_token_ids must be token ids in"),
    ({"id": "a", "prompt": "again"}, "line 2: id 'a' is used by an earlier line"),
], ids=["two-prompts", "unknown-field", "bad-top-p", "out-of-vocab", "duplicate-id"])
def test_a_bad_batch_line_is_reported_with_its_line_and_field(tiny_checkpoint, tmp_path, capsys, line, message):
    batch = tmp_path / "prompts.jsonl"
    batch.write_text(json.dumps({"id": "a", "prompt": "fine"}) + "\n" + json.dumps(line) + "\n")
    code = cli.main(["generate", "--checkpoint", str(tiny_checkpoint), "--batch-file", str(batch), "--dtype", "float32"])
    assert code == 2
    assert re.search(message, capsys.readouterr().err)


def test_generate_shows_the_load_progress_on_stderr_and_honours_packed_experts(tiny_checkpoint, capsys, caplog):
    code = cli.main(["generate", "--checkpoint", str(tiny_checkpoint), "--max-tokens", "2", "--dtype", "float32",
                     "--packed-experts", "yes"])
    err = capsys.readouterr().err
    assert code == 0, err
    assert re.search(r"loaded \d+\.\d MiB of weights in \d+\.\d s \(\d+ MB/s\)", err)
    assert "experts kept packed (MXFP4)" not in caplog.text  # asked for, not chosen: nothing to explain


def test_generate_refuses_a_checkpoint_too_big_for_the_free_memory_without_a_traceback(tiny_checkpoint, capsys,
                                                                                        monkeypatch):
    from gptoss import memory

    monkeypatch.setattr(memory, "available_bytes", lambda device: 1 << 20)
    code = cli.main(["generate", "--checkpoint", str(tiny_checkpoint), "--packed-experts", "no"])
    err = capsys.readouterr().err
    assert code == 1
    assert "gptoss-serve generate: error: " in err and "needs ~" in err and "packed_experts=True" in err
    assert "--packed-experts yes" in err and "Traceback" not in err


class FakeStream:
    def __init__(self, tty: bool):
        self.text, self.tty = "", tty

    def write(self, text: str) -> None:
        self.text += text

    def flush(self) -> None:
        pass

    def isatty(self) -> bool:
        return self.tty


@pytest.mark.parametrize("tty", [True, False], ids=["terminal", "log"])
def test_load_progress_is_printed_at_most_once_a_second_with_a_rate(tty):
    now = [100.0]
    stream = FakeStream(tty)
    printer = cli.LoadProgressPrinter(stream, clock=lambda: now[0])
    mib = 1 << 20
    for t, done in [(0.2, 10), (0.9, 20), (1.5, 30), (2.0, 40), (3.0, 100)]:
        now[0] = 100.0 + t
        printer(done * mib, 100 * mib)
    printer.finish()
    lines = ["loading weights: 30.0 MiB of 100.0 MiB (30%), 21 MB/s",
             "loading weights: 100.0 MiB of 100.0 MiB (100%), 35 MB/s",
             "loaded 100.0 MiB of weights in 3.0 s (35 MB/s)"]
    if tty:  # rewritten in place, the last line kept
        assert stream.text == "".join(f"\r{line}\x1b[K" for line in lines) + "\n"
    else:
        assert stream.text.splitlines() == lines
