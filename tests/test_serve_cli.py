"""`gptoss-serve serve`: a bad config stops before anything starts, naming the field; the default config
serves the embedded model (a subprocess with its own Ray instance) and Ctrl-C ends it cleanly."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
import requests

from serve.cli import main
from serve.config import AppConfig, ConfigError, parse_config
from tests.conftest import free_port


@pytest.mark.parametrize(("yaml_text", "named"), [
    ("group:\n  num_ranks: 0\n", "group.num_ranks"),
    ("engine:\n  max_num_seqs: lots\n", "engine.max_num_seqs"),
    ("model:\n  dtype: float8\n", "model.dtype: Input should be 'bfloat16' or 'float32'"),
    ("gateway:\n  colour: blue\n", "gateway.colour: unknown field"),
    ("modle:\n  checkpoint: /x\n", "modle: unknown field"),
    ("engine:\n  max_num_seqs: 64\n  max_num_batched_tokens: 32\n", "engine.max_num_batched_tokens must be >="),
    ("http:\n  port: 70000\n", "http.port"),
    ("engine: [1, 2\n", "not valid YAML"),
    ("- just\n- a list\n", "must be a mapping of sections"),
], ids=["zero-ranks", "wrong-type", "bad-choice", "unknown-key", "unknown-section", "cross-field", "port-range",
        "yaml-syntax", "not-a-mapping"])
def test_a_bad_config_exits_non_zero_naming_the_field(tmp_path, capsys, yaml_text, named):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml_text)
    assert main(["serve", str(path)]) == 2
    assert named in capsys.readouterr().err


def test_a_missing_config_file_and_a_group_size_the_model_cannot_split_are_named(tmp_path, capsys, tiny_checkpoint):
    assert main(["serve", str(tmp_path / "absent.yaml")]) == 2
    assert "cannot read the config" in capsys.readouterr().err
    path = tmp_path / "three.yaml"
    path.write_text(f"model:\n  checkpoint: {tiny_checkpoint}\ngroup:\n  num_ranks: 3\n")
    assert main(["serve", str(path)]) == 2
    assert "group.num_ranks must divide the model's 8 experts, got 3; one of [1, 2, 4, 8]" in capsys.readouterr().err


def test_the_config_converts_to_the_lower_layers_configs():
    config = parse_config({"engine": {"kv_cache_gib": 0.5, "max_model_len": 4096}, "group": {"num_ranks": 2},
                           "model": {"packed_experts": "auto"}})
    group = config.group_config("/ckpt", name="g", device="cpu")
    assert (group.num_ranks, group.device, group.packed_experts) == (2, "cpu", None)
    assert group.engine.kv_cache_bytes == 1 << 29 and group.engine.max_model_len == 4096
    assert AppConfig().served_model_name() == "gpt-oss-tiny-random"
    with pytest.raises(ConfigError, match="engine: engine config: max_model_len must be None or an int >= 2"):
        parse_config({"engine": {"max_model_len": 1}}).engine_config()


def test_the_default_config_serves_the_embedded_model_and_stops_on_ctrl_c(tmp_path):
    http_port, grpc_port = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # its own Ray, not the tests' cluster
    process = subprocess.Popen([sys.executable, "-m", "serve.cli", "serve", "--http-port", str(http_port),
                                "--grpc-port", str(grpc_port)], env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        while True:
            assert process.poll() is None, process.stdout.read()
            try:
                models = requests.get(f"http://127.0.0.1:{http_port}/v1/models", timeout=15)
                if models.status_code == 200:
                    break
            except requests.RequestException:  # not listening yet, or the app still deploying
                pass
            assert time.monotonic() < deadline, "the server did not come up"
            time.sleep(1)
        [model] = models.json()["data"]
        assert model["id"] == "gpt-oss-tiny-random"
        reply = requests.post(f"http://127.0.0.1:{http_port}/v1/chat/completions", timeout=60, json={
            "model": model["id"], "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 8})
        assert reply.status_code == 200 and reply.json()["usage"]["completion_tokens"] == 8
        os.killpg(process.pid, signal.SIGINT)
        output, _ = process.communicate(timeout=120)
        assert process.returncode == 0, output
        assert f"http://127.0.0.1:{http_port}/v1" in output and "shutting down" in output
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
