"""Stage 0 against a real OpenAI-compatible HTTP server on 127.0.0.1 that fails on purpose."""

import base64
import hashlib
import json
import logging
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from emovlm_kd.arguments import parse_stage_args
from emovlm_kd.instruction_records import read_records
from emovlm_kd.run_dir import complete_marker
from emovlm_kd.stages import instruction_data
from emovlm_kd.stages.instruction_data import MalformedAnswer, parse_answer
from emovlm_kd.testing import make_imagefolder

API_KEY = "sk-test-key"
CLASSES = ["negative", "neutral", "positive"]
MAX_REQUESTS = 200  # the server refuses more: no request loop can run away
RETRY_AFTER = 0.3
CLIENT_TIMEOUT = 0.5


class FakeChatServer:
    """Chat-completions server whose answer for an image follows a script: the n-th request for an image gets
    `plan[image][n]` (the last entry repeats). Records every request as `(image, behaviour, monotonic time)`."""

    def __init__(self, images: dict[str, tuple[str, str]], plan: dict[str, list[str]]):
        self.images = images  # sha256 of the file bytes -> (image key, label)
        self.plan = plan
        self.requests, self.errors, self.tags = [], [], {}
        self.release = threading.Event()  # lets slow handlers finish at teardown
        self._lock = threading.Lock()
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.httpd.daemon_threads = True
        self.base_url = f"http://127.0.0.1:{self.httpd.server_port}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.release.set()
        self.httpd.shutdown()
        self.httpd.server_close()

    def requests_for(self, image):
        return [(behaviour, at) for key, behaviour, at in self.requests if key == image]

    def _next(self, body: dict) -> tuple[str, str, str]:
        text = body["messages"][1]["content"][0]["text"]
        url = body["messages"][1]["content"][1]["image_url"]["url"]
        digest = hashlib.sha256(base64.b64decode(url.split(",", 1)[1])).hexdigest()
        image, label = self.images[digest]
        self.tags[image] = digest[:12]  # answers name the image by this tag (its path would name the label)
        with self._lock:
            if len(self.requests) >= MAX_REQUESTS:
                raise RuntimeError("too many requests")
            seen = sum(1 for key, _, _ in self.requests if key == image)
            script = self.plan[image]
            behaviour = script[min(seen, len(script) - 1)]
            self.requests.append((image, behaviour, time.monotonic()))
        if f"==Emotion Information==\n{label}\n==" not in text or ", ".join(CLASSES) not in text:
            self.errors.append(f"prompt for {image} does not give its label and the classes: {text!r}")
        return image, label, behaviour

    def _handler(self):
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _send(self, status, payload, headers=()):
                data = payload.encode() if isinstance(payload, str) else json.dumps(payload).encode()
                try:
                    self.send_response(status)
                    for name, value in headers:
                        self.send_header(name, value)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):  # the client gave up (timeout)
                    pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                if self.path != "/v1/chat/completions":
                    return self._send(404, {"error": {"message": f"no route {self.path}"}})
                authorization = self.headers.get("Authorization", "")
                if authorization != f"Bearer {API_KEY}" and not authorization.startswith("Basic "):
                    return self._send(401, {"error": {"message": "invalid api key"}})
                if body.get("model") != "fake-vision" or body.get("response_format") != {"type": "json_object"}:
                    server.errors.append(
                        f"unexpected request fields: { {k: body.get(k) for k in ('model', 'response_format')} }"
                    )
                image, label, behaviour = server._next(body)
                if behaviour == "429":
                    return self._send(429, {"error": {"message": "slow down"}}, [("Retry-After", str(RETRY_AFTER))])
                if behaviour in ("500", "503"):
                    return self._send(int(behaviour), {"error": {"message": "server error"}})
                if behaviour == "echo_500":  # a careless server repeats the request's credentials
                    return self._send(500, {"error": {"message": f"server error for {authorization}"}})
                if behaviour == "slow":
                    server.release.wait(4 * CLIENT_TIMEOUT)
                tag = server.tags[image]
                answer = {"observation": f"elements of {tag}", "reasoning": f"why {tag} feels that way"}
                content = {
                    "ok": json.dumps(answer),
                    "slow": json.dumps(answer),
                    "ok_fenced": "```json\n" + json.dumps(answer) + "\n```",
                    "not_json": "Sure! The image shows a lake.",
                    "leak": json.dumps({**answer, "reasoning": f"It is clearly {label.upper()}."}),
                    "missing_field": json.dumps({"observation": "a lake"}),
                    "echo": json.dumps({**answer, "observation": f"{answer['observation']}; {authorization}"}),
                    "echo_malformed": f"I was called with {authorization} and {self.path}",
                }[behaviour]
                message = {"role": "assistant", "content": content}
                choice = {"index": 0, "message": message, "finish_reason": "stop"}
                self._send(200, {"id": "x", "object": "chat.completion", "choices": [choice]})

        return Handler


@pytest.fixture
def dataset(tmp_path):
    root = make_imagefolder(tmp_path / "data", CLASSES, per_class={"train": 3, "val": 1}, splits=("train", "val"))
    images = sorted(path.relative_to(root).as_posix() for path in (root / "train").rglob("*.*"))
    digests = {
        hashlib.sha256((root / image).read_bytes()).hexdigest(): (image, image.split("/")[1]) for image in images
    }
    return root, images, digests


@pytest.fixture(autouse=True)
def hub_requests_allowed(monkeypatch):
    """huggingface_hub refuses every request in offline mode, also to a loopback server; conftest's socket guard
    still keeps the tests off the network."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)


def stage_args(root, run_dir, base_url, **overrides):
    argv = [
        "--data-dir",
        str(root),
        "--run-dir",
        str(run_dir),
        "--base-url",
        base_url,
        "--model",
        "fake-vision",
        "--api-key-env",
        "TEST_CHAT_KEY",
        "--concurrency",
        "3",
        "--timeout",
        str(CLIENT_TIMEOUT),
        "--max-retries",
        "2",
        "--backoff-base",
        "0.01",
        "--backoff-max",
        "0.05",
    ]
    for name, value in overrides.items():
        argv += [f"--{name.replace('_', '-')}", str(value)]
    return parse_stage_args(instruction_data, argv)


def check_first_run(first: dict, first_requests: int, output, server, images: list[str]):
    """Run 1 of `test_retries_failures_and_resume`: 5 answers done (after retries), 4 failures recorded."""
    records = read_records(output)
    assert not server.errors
    assert {k: first[k] for k in ("total", "done", "failed", "skipped", "retries", "complete")} == {
        "total": 9,
        "done": 5,
        "failed": 4,
        "skipped": 0,
        "retries": 6,
        "complete": False,
    }
    assert first_requests == 1 + 2 + 3 + 2 + 1 + 1 + 1 + 3 + 1
    lines = output.read_text().splitlines()
    assert len(lines) == 9 and sorted(json.loads(line)["image"] for line in lines) == images
    for index in (0, 1, 2, 3, 8):
        record = records[images[index]]
        assert record["status"] == "done"
        assert record["label"] == images[index].split("/")[1]
        assert record["observation"] == f"elements of {server.tags[images[index]]}"
        assert record["reasoning"] == f"why {server.tags[images[index]]} feels that way"
    assert [records[images[i]]["attempts"] for i in (0, 1, 2, 3)] == [1, 2, 3, 2]
    failures = {index: records[images[index]] for index in (4, 5, 6, 7)}
    assert all(record["status"] == "failed" for record in failures.values())
    assert "not a JSON object" in failures[4]["reason"] and failures[4]["raw"] == "Sure! The image shows a lake."
    assert "names the label" in failures[5]["reason"]
    assert "'reasoning'" in failures[6]["reason"]
    assert "HTTP 503" in failures[7]["reason"] and failures[7]["attempts"] == 3

    (rate_limited, first_at), (_, retried_at) = server.requests_for(images[1])
    assert rate_limited == "429" and retried_at - first_at >= RETRY_AFTER - 0.02
    (slow, slow_at), (_, after_timeout_at) = server.requests_for(images[3])
    assert slow == "slow" and after_timeout_at - slow_at >= CLIENT_TIMEOUT - 0.05


def check_second_run(second: dict, first_requests: int, output, server, images: list[str]):
    """Run 2: only the failed images are asked again, and all are done; the file holds one record per image."""
    retried = [image for image, _, _ in server.requests[first_requests:]]
    assert sorted(retried) == sorted(images[i] for i in (4, 5, 6, 7))  # done ones skipped, failed ones asked again
    assert {k: second[k] for k in ("done", "failed", "skipped", "complete")} == {
        "done": 4,
        "failed": 0,
        "skipped": 5,
        "complete": True,
    }
    records = read_records(output)
    assert len(output.read_text().splitlines()) == 9
    assert all(record["status"] == "done" for record in records.values())
    assert records[images[5]]["reasoning"] == f"why {server.tags[images[5]]} feels that way"


def test_retries_failures_and_resume(dataset, tmp_path, monkeypatch):
    root, images, digests = dataset
    monkeypatch.setenv("TEST_CHAT_KEY", API_KEY)
    assert len(images) == 9
    plan = dict(
        zip(
            images,
            [
                ["ok"],
                ["429", "ok"],  # Retry-After honoured
                ["500", "500", "ok"],  # two retries suffice
                ["slow", "ok"],  # beyond the client timeout, then fine
                ["not_json", "ok"],  # malformed: recorded, asked again on the next run
                ["leak", "ok"],  # names the label
                ["missing_field", "ok"],
                ["503", "503", "503", "ok"],  # retries exhausted in run 1
                ["ok_fenced"],  # JSON in a markdown fence is accepted
            ],
            strict=True,
        )
    )
    run_dir = tmp_path / "run"
    output = run_dir / "instruction_data.jsonl"

    with FakeChatServer(digests, plan) as server:
        first = instruction_data.run(*stage_args(root, run_dir, server.base_url))
        first_requests = len(server.requests)
        check_first_run(first, first_requests, output, server, images)
        assert not complete_marker(run_dir, "instruction_data").exists()

        with output.open("a") as file:  # a crash mid-write leaves a cut-off last line
            file.write('{"image": "train/negative/neg')
        second = instruction_data.run(*stage_args(root, run_dir, server.base_url))
        check_second_run(second, first_requests, output, server, images)
        assert complete_marker(run_dir, "instruction_data").exists()
        assert json.loads((run_dir / "labels.json").read_text())["class_names"] == CLASSES

        third = instruction_data.run(*stage_args(root, run_dir, server.base_url))
        assert (third["done"], third["failed"], third["skipped"]) == (0, 0, 9)
        assert len(server.requests) == first_requests + 4


def test_rejected_key_stops_the_run(dataset, tmp_path, monkeypatch):
    root, images, digests = dataset
    monkeypatch.setenv("TEST_CHAT_KEY", "wrong-key")
    with FakeChatServer(digests, {image: ["ok"] for image in images}) as server:
        with pytest.raises(RuntimeError, match="401.*API key was rejected"):
            instruction_data.run(*stage_args(root, tmp_path / "run", server.base_url))
        assert server.requests == []  # rejected before any image was scripted
    monkeypatch.delenv("TEST_CHAT_KEY")
    with pytest.raises(ValueError, match="TEST_CHAT_KEY"):
        instruction_data.run(*stage_args(root, tmp_path / "run", "http://127.0.0.1:9/v1"))


def test_answer_validation():
    assert parse_answer('{"observation": " a lake ", "reasoning": "calm water"}', "sadness") == (
        "a lake",
        "calm water",
    )
    assert parse_answer('noise {"observation": "a", "reasoning": "b", "extra": 1} noise', "awe") == ("a", "b")
    # whole words only: "sad" is not the label "sadness", "awesome" is not "awe"
    assert parse_answer('{"observation": "a sad dog", "reasoning": "awesome"}', "sadness") == ("a sad dog", "awesome")
    assert parse_answer('{"observation": "x", "reasoning": "awesome view"}', "awe") == ("x", "awesome view")
    bad = {
        '{"observation": "x", "reasoning": "It shows Sadness."}': "names the label",
        '{"observation": "x", "reasoning": "very high_valence"}': "names the label",
        '{"observation": "x", "reasoning": ""}': "'reasoning'",
        '{"observation": 3, "reasoning": "y"}': "'observation'",
        '["observation", "reasoning"]': "not an object",
        "": "not a JSON object",
    }
    for content, reason in bad.items():
        label = "high valence" if "valence" in content else "sadness"
        with pytest.raises(MalformedAnswer, match=reason):
            parse_answer(content, label)


def test_train_script_help(monkeypatch, capsys):
    import runpy

    script = Path(__file__).resolve().parent.parent / "train" / "instruction_data.py"
    monkeypatch.setattr("sys.argv", [str(script), "--help"])
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_path(str(script), run_name="__main__")
    usage = capsys.readouterr().out
    assert exit_info.value.code == 0 and "--base-url" in usage and "--concurrency" in usage


def test_offline_mode_is_a_clear_fatal_error(dataset, tmp_path, monkeypatch):
    """huggingface_hub refuses every request under HF_HUB_OFFLINE, also to a local server: one clear error."""
    from huggingface_hub import constants

    root, images, digests = dataset
    monkeypatch.setenv("TEST_CHAT_KEY", API_KEY)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with FakeChatServer(digests, {image: ["ok"] for image in images}) as server:
        with pytest.raises(RuntimeError, match="HF_HUB_OFFLINE is set: unset it for stage 0"):
            instruction_data.run(*stage_args(root, tmp_path / "run", server.base_url))
        assert server.requests == []


def test_inference_providers_settings(monkeypatch):
    from emovlm_kd.chat import ChatClient, parse_retry_after

    run_args, args = parse_stage_args(
        instruction_data, ["--run-dir", "R", "--provider", "together", "--model", "Qwen/Qwen2.5-VL-72B-Instruct"]
    )
    assert instruction_data.enabled(args)
    assert instruction_data._api_key(args) is None  # huggingface_hub's own token (HF_TOKEN or the cached login)
    monkeypatch.setenv("MY_PROVIDER_KEY", "key")
    args.api_key_env = "MY_PROVIDER_KEY"
    assert instruction_data._api_key(args) == "key"
    client = ChatClient(args.model, provider=args.provider, api_key="hf_test")
    assert (client.client.provider, client.model, client.endpoint) == (
        "together",
        "Qwen/Qwen2.5-VL-72B-Instruct",
        "Inference Providers (together)",
    )
    with pytest.raises(ValueError, match="a base URL .* or a provider"):
        ChatClient("m", base_url="http://127.0.0.1:9/v1", provider="together")
    assert parse_retry_after({"Retry-After-Ms": "250"}) == 0.25
    assert parse_retry_after({"retry-after": "Wed, 21 Oct 2015 07:28:00 GMT"}) < 0
    assert parse_retry_after({}) is None


def test_secrets_are_never_recorded_or_logged(dataset, tmp_path, monkeypatch, caplog, capsys):
    """A server echoing the API key and the base URL's credentials in answers and errors: neither reaches the
    instruction data, the markers, the settings, the logs or the tracker's event files."""
    from emovlm_kd.accelerator_setup import make_accelerator
    from emovlm_kd.stages import export

    root, images, digests = dataset
    password = "pa55-w0rd-s3cret"
    monkeypatch.setenv("TEST_CHAT_KEY", API_KEY)
    plan = {image: [behaviour] for image, behaviour in zip(images, ["echo", "echo_malformed", "echo_500", "ok"] * 3)}
    run_dir = tmp_path / "run"
    with FakeChatServer(digests, plan) as server, caplog.at_level(logging.DEBUG):
        # the key as a bearer token, then credentials in the URL (sent as basic auth), each echoed back
        for url in (server.base_url, server.base_url.replace("http://", f"http://someone:{password}@")):
            run_args, args = stage_args(root, run_dir, url, report_to="tensorboard")
            instruction_data.run(run_args, args)
            records = read_records(run_dir / "instruction_data.jsonl")
            assert any("<redacted>" in json.dumps(record) for record in records.values())  # the echoes were there
            (run_dir / "instruction_data.jsonl").rename(run_dir / f"instruction_data-{len(url)}.jsonl")
        # a tracked stage given the same settings and a Hub token: its tracker config is redacted too
        token = "hf_" + "T0ken" * 6
        export_args = parse_stage_args(
            export, ["--run-dir", str(run_dir), "--report-to", "tensorboard", "--hub-token", token]
        )
        accelerator = make_accelerator(export_args[0], "export", export_args[1], args)
        accelerator.end_training()
    assert {record["status"] for record in records.values()} == {"done", "failed"}
    written = b"".join(path.read_bytes() for path in run_dir.rglob("*") if path.is_file())
    assert list((run_dir / "logs").rglob("*tfevents*")), "no TensorBoard events written"
    printed = caplog.text + "".join(capsys.readouterr())
    basic = base64.b64encode(f"someone:{password}".encode()).decode()
    for secret in (API_KEY, password, basic, token):
        assert secret.encode() not in written and secret not in printed, secret


def test_refused_connection_is_retried_then_reported(monkeypatch):
    """A server that is not there: huggingface_hub's transport error is retried, then reported with the attempts."""
    import socket

    from huggingface_hub import constants

    from emovlm_kd.chat import ChatClient, ChatRequestError, RetryPolicy

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    with socket.socket() as probe:  # a free local port, closed again: connections to it are refused
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    retry = RetryPolicy(max_retries=2, backoff_base=0.01, backoff_max=0.01)
    with ChatClient("m", base_url=f"http://127.0.0.1:{port}/v1", retry=retry) as client:
        with pytest.raises(ChatRequestError, match="connection failed .*gave up after 3 attempts"):
            client.complete([{"role": "user", "content": "hi"}])
        assert client.retries == 2
