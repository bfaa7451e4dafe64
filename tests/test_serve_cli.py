"""`gptoss-serve serve`: a bad config stops before anything starts, naming the field; the default config
serves the embedded model (a subprocess with its own Ray instance) and Ctrl-C ends it cleanly."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest
import requests

from serve.cli import _with_overrides, build_parser, main
from serve.config import AppConfig, ConfigError, parse_config
from serve.proto.gptoss.v1 import gptoss_pb2 as pb
from serve.proto.gptoss.v1 import gptoss_pb2_grpc as pb_grpc
from tests.conftest import free_port
from tests.serve_helpers import metric_total


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
    ("model_server:\n  num_replicas: 2\n  autoscaling: {max_replicas: 3}\n", "set num_replicas or autoscaling"),
    ("model_server:\n  autoscaling: {min_replicas: 3, max_replicas: 2}\n", "max_replicas (2) must be >= min_replicas"),
    ("model_server:\n  router: {policy: random}\n", "model_server.router.policy"),
    ("http:\n  ssl_certfile: /tmp/cert.pem\n", "ssl_certfile and ssl_keyfile must be given together"),
    ("auth:\n  api_keys_path: /keys\n", "auth.api_keys_path: unknown field"),
    ("eplb:\n  enabled: true\n", "eplb.enabled needs group.num_ranks >= 2"),
    ("eplb:\n  transfer: rdma\n", "eplb.transfer"),
], ids=["zero-ranks", "wrong-type", "bad-choice", "unknown-key", "unknown-section", "cross-field", "port-range",
        "yaml-syntax", "not-a-mapping", "replicas-and-autoscaling", "autoscaling-bounds", "router-policy",
        "cert-without-key", "auth-unknown", "eplb-one-rank", "eplb-transfer"])
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
    path.write_text(f"model:\n  checkpoint: {tiny_checkpoint}\ngroup:\n  num_ranks: 4\n"
                    "eplb:\n  enabled: true\n  redundant_experts_per_rank: 7\n")
    assert main(["serve", str(path)]) == 2
    assert "eplb.redundant_experts_per_rank must be at most 6" in capsys.readouterr().err


def test_the_config_converts_to_the_lower_layers_configs():
    config = parse_config({"engine": {"kv_cache_gib": 0.5, "max_model_len": 4096}, "group": {"num_ranks": 2},
                           "model": {"packed_experts": "auto"}})
    group = config.group_config("/ckpt", name="g", device="cpu")
    assert (group.num_ranks, group.device, group.packed_experts) == (2, "cpu", None)
    assert group.engine.kv_cache_bytes == 1 << 29 and group.engine.max_model_len == 4096
    assert not group.eplb.enabled
    eplb = parse_config({"group": {"num_ranks": 2}, "eplb": {"enabled": True, "interval_steps": 500,
                                                             "transfer": "communicator"}})
    group = eplb.group_config("/ckpt", name="g")
    assert (group.eplb.enabled, group.eplb.interval_steps, group.eplb.transfer) == (True, 500, "communicator")
    assert AppConfig().served_model_name() == "gpt-oss-tiny-random"
    with pytest.raises(ConfigError, match="engine: engine config: max_model_len must be None or an int >= 2"):
        parse_config({"engine": {"max_model_len": 1}}).engine_config()


@pytest.mark.parametrize("gateway, direct", [({}, True), ({"num_replicas": 2}, False),
                                             ({"num_replicas": 2, "direct_ingress": True}, True),
                                             ({"direct_ingress": False}, False)])
def test_direct_ingress_is_the_default_only_where_one_gateway_replica_serves_the_ports(gateway, direct):
    """Several gateway replicas on one node would each take their own port: Serve's proxies put them behind
    one, unless the config asks for direct ingress anyway."""
    assert parse_config({"gateway": gateway}).gateway.uses_direct_ingress() is direct
    args = build_parser().parse_args(["serve", "--serve-proxy"])
    assert _with_overrides(parse_config({"gateway": gateway}), args).gateway.uses_direct_ingress() is False


def start_server(*args: str) -> subprocess.Popen:
    """`gptoss-serve serve ARGS` as a subprocess with its own Ray instance (not the tests' cluster)."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    return subprocess.Popen([sys.executable, "-m", "serve.cli", "serve", *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)


def wait_until_serving(process: subprocess.Popen, url: str, **request_args) -> requests.Response:
    """GET `url` until it answers 200 (bounded); the process must stay up meanwhile."""
    deadline = time.monotonic() + 240
    while True:
        assert process.poll() is None, process.stdout.read()
        try:
            response = requests.get(url, timeout=15, **request_args)
            if response.status_code == 200:
                return response
        except requests.RequestException:  # not listening yet, or the app still deploying
            pass
        assert time.monotonic() < deadline, "the server did not come up"
        time.sleep(1)


def stop_server(process: subprocess.Popen) -> str:
    """Ctrl-C, then the output of a clean exit."""
    os.killpg(process.pid, signal.SIGINT)
    output, _ = process.communicate(timeout=120)
    assert process.returncode == 0, output
    return output


def test_the_default_config_serves_the_embedded_model_and_stops_on_ctrl_c(tmp_path):
    http_port, grpc_port = free_port(), free_port()
    process = start_server("--http-port", str(http_port), "--grpc-port", str(grpc_port))
    try:
        models = wait_until_serving(process, f"http://127.0.0.1:{http_port}/v1/models")
        [model] = models.json()["data"]
        assert model["id"] == "gpt-oss-tiny-random"
        reply = requests.post(f"http://127.0.0.1:{http_port}/v1/chat/completions", timeout=60, json={
            "model": model["id"], "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 8})
        assert reply.status_code == 200 and reply.json()["usage"]["completion_tokens"] == 8
        # The gateway's metrics on the API port, once Ray's exporter has them.
        deadline = time.monotonic() + 60
        while "ray_gptoss_generation_tokens_total" not in (metrics := requests.get(
                f"http://127.0.0.1:{http_port}/metrics", timeout=30).text):
            assert time.monotonic() < deadline, metrics[:2000]
            time.sleep(1)
        assert "# TYPE ray_gptoss_generation_tokens_total counter" in metrics
        # The gRPC server (the gateway replica's own) refuses a message over gateway.max_request_bytes
        # (8 MiB by default) itself.
        with grpc.insecure_channel(f"127.0.0.1:{grpc_port}", options=[("grpc.max_send_message_length", 64 << 20)]) \
                as channel:
            with pytest.raises(grpc.RpcError) as info:
                list(pb_grpc.GptossServiceStub(channel).Generate(pb.GenerateRequest(text="x" * (9 << 20)), timeout=60))
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        output = stop_server(process)
        assert f"http://127.0.0.1:{http_port}/v1" in output and "shutting down" in output
        assert f"metrics:    http://127.0.0.1:{http_port}/metrics" in output
        # One gateway replica: it serves the ports itself (Serve's direct ingress), no proxy on the way.
        assert "direct ingress: the gateway replica serves these ports itself" in output
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def test_through_serve_proxies_both_apis_stream_refuse_oversized_messages_and_abort_on_disconnect():
    """--serve-proxy (gateway.direct_ingress false): the clients reach the gateway through Serve's proxies,
    which stream over both APIs, refuse oversized gRPC messages, and pass a client's leaving on as an abort."""
    http_port, grpc_port = free_port(), free_port()
    process = start_server("--http-port", str(http_port), "--grpc-port", str(grpc_port), "--serve-proxy")
    try:
        [model] = wait_until_serving(process, f"http://127.0.0.1:{http_port}/v1/models").json()["data"]
        with requests.post(f"http://127.0.0.1:{http_port}/v1/chat/completions", timeout=60, stream=True, json={
                "model": model["id"], "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 12,
                "stream": True, "stream_options": {"include_usage": True}}) as reply:
            events = [line for line in reply.iter_lines() if line.startswith(b"data: ")]
        assert reply.status_code == 200 and events[-1] == b"data: [DONE]"
        assert json.loads(events[-2][6:])["usage"]["completion_tokens"] == 12
        with grpc.insecure_channel(f"127.0.0.1:{grpc_port}", options=[("grpc.max_send_message_length", 64 << 20)]) \
                as channel:
            stub = pb_grpc.GptossServiceStub(channel)
            replies = list(stub.Generate(pb.GenerateRequest(token_ids=pb.TokenIds(ids=[1, 2, 3]),
                                                            sampling=pb.SamplingParams(max_tokens=10)), timeout=60))
            assert sum(len(r.token_ids) for r in replies) == 10
            with pytest.raises(grpc.RpcError) as info:
                list(stub.Generate(pb.GenerateRequest(text="x" * (9 << 20)), timeout=60))
            assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            # Clients that go away (a gRPC cancel, an HTTP disconnect) abort their requests in the engine.
            call = stub.Generate(pb.GenerateRequest(token_ids=pb.TokenIds(ids=list(range(3, 90))),
                                                    sampling=pb.SamplingParams(max_tokens=1900, temperature=1)))
            next(call)
            call.cancel()
        with requests.post(f"http://127.0.0.1:{http_port}/v1/completions", timeout=60, stream=True, json={
                "model": model["id"], "prompt": list(range(3, 90)), "max_tokens": 1900, "temperature": 1,
                "stream": True}) as reply:
            next(reply.iter_lines())
        aborted = metric_total(f"http://127.0.0.1:{http_port}/metrics", "ray_gptoss_request_success_total",
                               'finished_reason="abort"', at_least=2, timeout_s=60)
        assert aborted == 2
        output = stop_server(process)
        assert "direct ingress" not in output
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def write_certificates(folder: Path) -> tuple[Path, Path, Path]:
    """A self-signed CA and a server certificate for 127.0.0.1 signed by it: (ca, cert, key) PEM files."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.UTC)

    def certificate(subject: str, key, issuer: str, signer, ca: bool):
        builder = (x509.CertificateBuilder()
                   .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
                   .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer)]))
                   .public_key(key.public_key()).serial_number(x509.random_serial_number())
                   .not_valid_before(now - datetime.timedelta(minutes=5))
                   .not_valid_after(now + datetime.timedelta(days=1))
                   .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
        if not ca:
            builder = builder.add_extension(x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        return builder.sign(signer, hashes.SHA256())

    ca_key, server_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca = certificate("gptoss-test-ca", ca_key, "gptoss-test-ca", ca_key, ca=True)
    server = certificate("127.0.0.1", server_key, "gptoss-test-ca", ca_key, ca=False)
    paths = folder / "ca.pem", folder / "server.pem", folder / "server.key"
    paths[0].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(server.public_bytes(serialization.Encoding.PEM))
    paths[2].write_bytes(server_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                  serialization.NoEncryption()))
    return paths


def test_https_with_api_keys_works_with_the_ca_and_fails_without_it(tmp_path):
    import grpc
    import openai

    from serve.proto.gptoss.v1 import gptoss_pb2 as pb
    from serve.proto.gptoss.v1 import gptoss_pb2_grpc as pb_grpc

    http_client = getattr(openai, "DefaultHttpx2Client", None) or openai.DefaultHttpxClient  # by SDK version
    ca, cert, key = write_certificates(tmp_path)
    (tmp_path / "keys").write_text("team sk-tls-test-key\n")
    http_port, grpc_port = free_port(), free_port()
    config = tmp_path / "tls.yaml"
    config.write_text(f"""
auth: {{api_keys_file: {tmp_path / "keys"}}}
http: {{port: {http_port}, ssl_certfile: {cert}, ssl_keyfile: {key}}}
grpc: {{port: {grpc_port}}}
engine: {{kv_cache_gib: 0.05, max_num_seqs: 8, max_num_batched_tokens: 256}}
""")
    process = start_server(str(config))
    base = f"https://127.0.0.1:{http_port}"
    try:
        wait_until_serving(process, f"{base}/health", verify=str(ca))  # health stays open by default
        with openai.OpenAI(base_url=f"{base}/v1", api_key="sk-tls-test-key", max_retries=0, timeout=60,
                           http_client=http_client(verify=str(ca))) as client:
            reply = client.completions.create(model=client.models.list().data[0].id, prompt=[1, 2, 3], max_tokens=4)
            assert reply.usage.completion_tokens == 4
        with openai.OpenAI(base_url=f"{base}/v1", api_key="sk-tls-test-key", max_retries=0, timeout=30) as client:
            with pytest.raises(openai.APIConnectionError):  # the server's CA is not among the system's
                client.models.list()
        with openai.OpenAI(base_url=f"{base}/v1", api_key="sk-wrong", max_retries=0, timeout=30,
                           http_client=http_client(verify=str(ca))) as client:
            with pytest.raises(openai.AuthenticationError):
                client.models.list()
        with pytest.raises(requests.ConnectionError):  # plain HTTP on the TLS port
            requests.get(f"http://127.0.0.1:{http_port}/health", timeout=10)
        # Ray Serve's gRPC proxy has no TLS: plaintext, with the key in the metadata.
        with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
            request = pb.GenerateRequest(token_ids=pb.TokenIds(ids=[1, 2, 3]), sampling=pb.SamplingParams(max_tokens=2))
            replies = list(pb_grpc.GptossServiceStub(channel).Generate(
                request, metadata=[("authorization", "Bearer sk-tls-test-key")], timeout=60))
            assert replies[-1].usage.completion_tokens == 2
        assert f"https://127.0.0.1:{http_port}/v1" in stop_server(process)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
