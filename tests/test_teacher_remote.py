"""A teacher on another machine: API key, https, and its identity checked remotely.

The server is a small fake of vLLM's OpenAI-compatible endpoints (python's http.server, TLS
with a self-signed certificate made by the openssl command): /v1/models, /tokenize (with
the tiny model's tokenizer) and /v1/completions (prompt logprobs that rank each sent token
first), and the API-key rule of vLLM's middleware (a Bearer token on /v1 paths).
"""

from __future__ import annotations

import json
import ssl
import subprocess
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from tests.fixtures.tiny_model import build_tiny_model, tiny_model_dir
from tests.train_helpers import write_teacher_shards
from train.config import load_config
from vllm_engine.teacher_client import TeacherClient, TeacherMismatch, TeacherRequestError

KEY = "sk-kdshards-test-0123456789abcdef"
SERVED = "teacher-7b"  # what the fake server reports; its folder is not on this machine
ROOT = "/srv/models/teacher-7b"
K = 16


class FakeTeacher(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, tokenizer, api_key: str | None, certs: tuple[Path, Path] | None):
        super().__init__(("127.0.0.1", 0), Handler)
        self.tokenizer, self.api_key = tokenizer, api_key
        self.tamper_probe = False
        self.authorizations: list[str | None] = []
        if certs:
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            ctx.load_cert_chain(certfile=certs[0], keyfile=certs[1])
            self.socket = ctx.wrap_socket(self.socket, server_side=True)
        self.scheme = "https" if certs else "http"
        threading.Thread(target=self.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"{self.scheme}://127.0.0.1:{self.server_address[1]}"

    def close(self) -> None:
        self.shutdown()
        self.server_close()


class Handler(BaseHTTPRequestHandler):
    server: FakeTeacher

    def log_message(self, *args):  # keep the test output clean
        pass

    def reply(self, code: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def authorized(self) -> bool:
        auth = self.headers.get("Authorization")
        self.server.authorizations.append(auth)
        key = self.server.api_key
        if key and self.path.startswith("/v1") and auth != f"Bearer {key}":
            self.reply(401, {"error": "Unauthorized"})
            return False
        return True

    def do_GET(self):
        if self.authorized() and self.path == "/v1/models":
            self.reply(200, {"data": [{"id": SERVED, "root": ROOT, "max_model_len": 512}]})

    def do_POST(self):
        if not self.authorized():
            return
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        if self.path == "/tokenize":
            ids = self.server.tokenizer(body["prompt"], add_special_tokens=False)["input_ids"]
            self.reply(200, {"tokens": ids[:-1] if self.server.tamper_probe else ids})
        elif self.path == "/v1/completions":
            sent = body["prompt"]
            vocab = len(self.server.tokenizer)
            entries = [None] + [
                {str((t + r) % vocab): {"logprob": -1.0 - 0.25 * r} for r in range(K)}
                for t in sent[1:]
            ]
            choice = {"prompt_token_ids": sent, "prompt_logprobs": entries}
            self.reply(200, {"choices": [choice]})
        else:
            self.reply(404, {"error": self.path})


@pytest.fixture(scope="module")
def certs(tmp_path_factory) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 (it is its own CA bundle)."""
    d = tmp_path_factory.mktemp("tls")
    cert, key = d / "cert.pem", d / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
         "-keyout", str(key), "-out", str(cert), "-subj", "/CN=127.0.0.1",
         "-addext", "subjectAltName=IP:127.0.0.1"],
        check=True, capture_output=True,
    )  # fmt: skip
    return cert, key


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir())


@pytest.fixture
def teacher(tokenizer, certs):
    srv = FakeTeacher(tokenizer, KEY, certs)
    yield srv
    srv.close()


def test_api_key_goes_over_https_and_never_into_errors(teacher, tokenizer, certs):
    client = TeacherClient(teacher.url, K, api_key=KEY, ca_file=str(certs[0]))
    said = client.connect(tokenizer, SERVED)
    assert said.endswith("teacher identity: model name ok, tokenizer probe ok (remote)")
    assert KEY not in said
    assert teacher.authorizations and set(teacher.authorizations) == {f"Bearer {KEY}"}
    score = client.score([5, 6, 7], [8, 9])
    assert score.topk_ids[:, 0].tolist() == [8, 9]  # the fake ranks the sent token first
    client.close()

    with pytest.raises(TeacherRequestError, match="HTTP 401.*onpolicy.teacher_api_key_env") as e:
        TeacherClient(teacher.url, K, ca_file=str(certs[0])).connect(tokenizer, SERVED)
    assert "wants an API key" in str(e.value)
    wrong = "sk-wrong-key-9876543210"
    with pytest.raises(TeacherRequestError, match="refused the API key") as e:
        TeacherClient(teacher.url, K, api_key=wrong, ca_file=str(certs[0])).connect(tokenizer)
    assert wrong not in str(e.value) and KEY not in str(e.value)


def test_https_needs_a_trusted_certificate(teacher, tokenizer, certs, tmp_path):
    # The system CAs do not know a self-signed certificate: refused at once, not retried.
    client = TeacherClient(teacher.url, K, api_key=KEY, give_up_after_s=60)
    with pytest.raises(TeacherRequestError, match="TLS failed.*onpolicy.teacher_ca_file"):
        client.connect(tokenizer, SERVED)
    assert client.num_retries == 0
    with pytest.raises(FileNotFoundError, match="nowhere.pem.*no such file"):
        TeacherClient(teacher.url, K, ca_file=str(tmp_path / "nowhere.pem"))
    with pytest.raises(ValueError, match="is for https"):
        TeacherClient("http://127.0.0.1:9", K, ca_file=str(certs[0]))


def test_remote_identity_model_name_and_probe(teacher, tokenizer, certs):
    def connect(name=""):
        return TeacherClient(teacher.url, K, api_key=KEY, ca_file=str(certs[0])).connect(
            tokenizer, name
        )

    assert connect(ROOT).endswith("model name ok, tokenizer probe ok (remote)")
    with pytest.raises(TeacherMismatch, match="serves model 'teacher-7b'.*not 'teacher-70b'"):
        connect("teacher-70b")
    assert "model name not checked (none given), tokenizer probe ok (remote)" in connect()
    teacher.tamper_probe = True
    with pytest.raises(TeacherMismatch, match="tokenizes a probe text differently"):
        connect(SERVED)


def test_api_key_env_must_name_a_variable_and_is_never_echoed():
    over = ["onpolicy.teacher_api_key_env=KDSHARDS_TEACHER_KEY"]
    cfg = load_config("configs/train/onpolicy.yaml", over)
    assert cfg.onpolicy.teacher_api_key_env == "KDSHARDS_TEACHER_KEY"
    with pytest.raises(ValueError, match="name of an environment variable") as e:
        load_config("configs/train/onpolicy.yaml", [f"onpolicy.teacher_api_key_env={KEY}"])
    assert KEY not in str(e.value)


@pytest.mark.slow
def test_training_against_a_remote_https_teacher_with_a_key(
    tokenizer, certs, tmp_path, monkeypatch, capfd
):
    from train.__main__ import main

    shards = write_teacher_shards(tmp_path / "shards", tiny_model_dir(), examples=12, k=K)
    student = build_tiny_model(tmp_path / "student", seed=7)
    out = tmp_path / "run"
    srv = FakeTeacher(tokenizer, KEY, certs)
    args = [
        "configs/train/onpolicy.yaml",
        f"model.path={student}",
        f"data.shards={shards}",
        f"out_dir={out}",
        "data.batch_tokens=256",
        "max_steps=2",
        "save_every=2",
        f"onpolicy.teacher_url={srv.url}",
        "onpolicy.lmbda=1",
        "onpolicy.max_new_tokens=6",
        "onpolicy.max_prompts=2",
        "onpolicy.sampler=hf",
        "onpolicy.teacher_api_key_env=KDSHARDS_TEST_TEACHER_KEY",
        f"onpolicy.teacher_ca_file={certs[0]}",
        f"onpolicy.teacher_model={SERVED}",
    ]
    try:
        with pytest.raises(ValueError, match="KDSHARDS_TEST_TEACHER_KEY: that environment"):
            main(args)
        monkeypatch.setenv("KDSHARDS_TEST_TEACHER_KEY", KEY)
        main(args)
    finally:
        srv.close()
    printed = capfd.readouterr()
    assert "teacher identity: model name ok, tokenizer probe ok (remote)" in printed.out
    assert len(open(out / "metrics.jsonl").readlines()) == 2
    assert set(srv.authorizations) == {f"Bearer {KEY}"}
    # The key is nowhere: not printed, not in the resolved configs, logs or checkpoints.
    assert KEY not in printed.out + printed.err
    files = [p for p in out.rglob("*") if p.is_file()]
    assert any(p.name == "config.yaml" for p in files)
    for p in files:
        assert KEY.encode() not in p.read_bytes(), p
    saved = (out / "config.yaml").read_text()
    assert "teacher_api_key_env: KDSHARDS_TEST_TEACHER_KEY" in saved


@pytest.mark.slow
def test_a_real_vllm_teacher_server_with_an_api_key(tokenizer, tmp_path, monkeypatch):
    pytest.importorskip("vllm")
    from vllm_engine.teacher_server import TeacherServer

    tiny = str(tiny_model_dir())
    with TeacherServer(tiny, log=tmp_path / "vllm.log", api_key=KEY) as server:
        assert KEY not in " ".join(map(str, server.proc.args))  # not on the command line
        with pytest.raises(TeacherRequestError, match="HTTP 401.*teacher_api_key_env"):
            TeacherClient(server.url, K).connect(tokenizer)
        client = TeacherClient(server.url, K, api_key=KEY)
        said = client.connect(tokenizer, tiny)
        assert said.endswith("teacher identity: fingerprint ok, tokenizer probe ok (local)")
        assert client.score([5, 6, 7], [8, 9]).topk_ids.shape == (2, K)
        client.close()
        # Seen from another machine (the model folder is not readable there): the name the
        # server reports and its tokenizer's answer on the probe decide.
        monkeypatch.setattr(TeacherClient, "root_is_local", lambda self: False)
        said = TeacherClient(server.url, K, api_key=KEY).connect(tokenizer, tiny)
        assert said.endswith("teacher identity: model name ok, tokenizer probe ok (remote)")
        with pytest.raises(TeacherMismatch, match="refusing an unknown teacher"):
            TeacherClient(server.url, K, api_key=KEY).connect(tokenizer, "another/model")
