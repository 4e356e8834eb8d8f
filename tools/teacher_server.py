"""Start and stop a vLLM OpenAI-compatible teacher server (tests, benchmarks).

`make teacher-server` runs the same command in the foreground. On the CPU build of vLLM,
`vllm serve` fails (it looks for the metadata of a package named `vllm`), so the server is
started as `python -m vllm.entrypoints.openai.api_server`; VLLM_CPU_KVCACHE_SPACE (GiB)
defaults to 1 here, else vLLM reserves most of the node's memory.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server_command(
    model: str | Path, port: int, *, max_model_len: int, max_logprobs: int, eager: bool = True
) -> list[str]:
    cmd = [
        sys.executable,
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        str(model),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--max-model-len",
        str(max_model_len),
        "--dtype",
        "float32",
        "--max-logprobs",
        str(max_logprobs),
    ]
    return cmd + (["--enforce-eager"] if eager else [])


class TeacherServer:
    """One api_server subprocess (in its own process group, so that kill() also ends the
    engine processes it spawned)."""

    def __init__(
        self,
        model: str | Path,
        port: int | None = None,
        *,
        max_model_len: int = 512,
        max_logprobs: int = 64,
        log: str | Path | None = None,
    ):
        self.model, self.port = model, port or free_port()
        self.max_model_len, self.max_logprobs = max_model_len, max_logprobs
        self.log = Path(log) if log else None
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout_s: float = 300.0) -> TeacherServer:
        env = {
            **os.environ,
            "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1"),
        }
        out = open(self.log, "ab") if self.log else subprocess.DEVNULL
        cmd = server_command(
            self.model, self.port, max_model_len=self.max_model_len, max_logprobs=self.max_logprobs
        )
        self.proc = subprocess.Popen(
            cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"teacher server exited with {self.proc.returncode} ({self.log})"
                )
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=2) as r:
                    if r.status == 200:
                        return self
            except OSError:
                pass
            time.sleep(0.5)
        self.kill()
        raise TimeoutError(f"teacher server not healthy after {timeout_s:.0f} s ({self.log})")

    def kill(self) -> None:
        """SIGKILL the server and its engine processes; wait until they are gone."""
        if self.proc is None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait()
        self.proc = None

    def __enter__(self) -> TeacherServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.kill()
