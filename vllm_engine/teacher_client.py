"""HTTP client for a teacher behind a vLLM OpenAI-compatible server (on-policy distillation).

The teacher is never loaded into the trainer's process: it runs as
`python -m vllm.entrypoints.openai.api_server --model DIR --max-logprobs K` (`vllm serve` on
GPU machines) and scores token-id prompts on /v1/completions with `prompt_logprobs=K`,
`max_tokens=1`. Entry j of `prompt_logprobs` is the teacher's distribution that predicted
token j (entry 0 is null), each a dict token id -> {logprob, rank, ...} holding the top K,
plus the actual token when it is outside them; the values are raw (temperature 1).

Faults: every request has a timeout; connection errors, timeouts and 5xx answers are retried
with exponential backoff until `give_up_after_s` has passed since the first failure (a
restarting server comes back), then `TeacherUnavailable` is raised. An answer that does not
match what was sent (other prompt ids, missing entries, fewer than K logprobs, the actual
token absent) is retried `retries` times and then refused with `TeacherAnswerError`: nothing
is ever trained on a partial or mismatched answer. A 4xx answer is a configuration error
(e.g. K above the server's --max-logprobs) and raises `TeacherRequestError` at once.

A remote teacher: an API key (`api_key`, sent as `Authorization: Bearer`; the trainer reads
it from the environment variable `onpolicy.teacher_api_key_env` names, so it is in no config
or log) and https (system CAs, or `ca_file` for a private CA or a self-signed certificate).
"""

from __future__ import annotations

import json
import ssl
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from shards.fingerprint import tokenizer_fingerprint
from shards.topk import TopKError, topk_arrays

PROBE = "Knowledge distillation: 12 + 30 = 42. Paris, Berlin; def f(x): return x * 2"


class TeacherUnavailable(RuntimeError):
    """The teacher server did not answer within give_up_after_s."""


class TeacherAnswerError(RuntimeError):
    """The teacher answered something that does not match the request."""


class TeacherRequestError(RuntimeError):
    """The server refused the request (4xx): a configuration error, not retried."""


class TeacherMismatch(ValueError):
    """The server's model or tokenizer is not the one the student was built for."""


class _Retry(Exception):
    """A transient failure (connection, timeout, 5xx): retry with backoff."""


@dataclass
class TeacherScore:
    """The teacher's raw top-k on the T response tokens of one request."""

    topk_ids: np.ndarray  # (T, K) int64
    topk_logprobs: np.ndarray  # (T, K) float32
    token_logprob: np.ndarray  # (T,) float32: logprob of each response token


class TeacherClient:
    def __init__(
        self,
        url: str,
        k: int,
        *,
        timeout_s: float = 60.0,
        retries: int = 3,
        backoff_s: float = 0.5,
        max_backoff_s: float = 10.0,
        give_up_after_s: float = 300.0,
        concurrency: int = 8,
        api_key: str | None = None,
        ca_file: str | None = None,
    ):
        self.url = url.rstrip("/")
        self._headers = {"Content-Type": "application/json"}
        if api_key:  # kept in the request headers only: never printed, never in an error
            self._headers["Authorization"] = f"Bearer {api_key}"
        self._ssl = None
        if ca_file and not Path(ca_file).is_file():
            raise FileNotFoundError(f"CA file {ca_file} (for the teacher's https): no such file")
        if self.url.startswith("https://"):
            self._ssl = ssl.create_default_context(cafile=ca_file or None)
        elif ca_file:
            raise ValueError(f"a CA file ({ca_file}) is for https, but the teacher is {self.url}")
        self.k = k
        self.timeout_s, self.retries = timeout_s, retries
        self.backoff_s, self.max_backoff_s = backoff_s, max_backoff_s
        self.give_up_after_s = give_up_after_s
        self.pool = ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="teacher")
        self.model: str | None = None
        self.root: str | None = None
        self.max_model_len: int | None = None
        self.num_retries = 0  # transient failures retried so far (for logging)

    # ---- transport -------------------------------------------------------------------------

    def _http(self, path: str, body: dict | None = None) -> dict:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, headers=self._headers)
        try:
            with urllib.request.urlopen(req, timeout=self.timeout_s, context=self._ssl) as resp:
                return json.loads(resp.read())
        except urllib.error.HTTPError as e:
            detail = e.read().decode(errors="replace")[:500]
            if e.code >= 500 or e.code in (408, 429):
                raise _Retry(f"HTTP {e.code} from {self.url}{path}: {detail}") from e
            hint = ""
            if e.code in (401, 403):
                hint = (
                    "; the server wants an API key: name the environment variable holding it "
                    "in onpolicy.teacher_api_key_env"
                    if "Authorization" not in self._headers
                    else "; the server refused the API key of onpolicy.teacher_api_key_env"
                )
            raise TeacherRequestError(f"HTTP {e.code} from {self.url}{path}: {detail}{hint}") from e
        except urllib.error.URLError as e:
            if isinstance(e.reason, ssl.SSLError):  # a certificate is not a passing failure
                raise TeacherRequestError(
                    f"{self.url}{path}: TLS failed ({e.reason}); for a private CA or a "
                    "self-signed certificate, set onpolicy.teacher_ca_file to its CA bundle"
                ) from e
            raise _Retry(f"{self.url}{path}: {e}") from e
        except (ConnectionError, TimeoutError, OSError) as e:
            raise _Retry(f"{self.url}{path}: {e}") from e
        except json.JSONDecodeError as e:
            raise _Retry(f"{self.url}{path}: not JSON ({e})") from e

    def call(self, path: str, body: dict | None = None, check=None):
        """One request with retries; `check(answer)` parses it or raises TeacherAnswerError."""
        first_failure, attempt, bad_answers = None, 0, 0
        while True:
            try:
                answer = self._http(path, body)
                return check(answer) if check else answer
            except _Retry as e:
                now = time.monotonic()
                first_failure = first_failure or now
                if now - first_failure >= self.give_up_after_s:
                    raise TeacherUnavailable(
                        f"teacher server {self.url} did not answer for {now - first_failure:.0f}"
                        f" s (give_up_after_s={self.give_up_after_s:g}); last error: {e}"
                    ) from e
                self.num_retries += 1
                time.sleep(min(self.max_backoff_s, self.backoff_s * 2**attempt))
                attempt += 1
            except TeacherAnswerError:
                if bad_answers >= self.retries or body is None:
                    raise
                bad_answers += 1
                self.num_retries += 1

    # ---- start-up checks -------------------------------------------------------------------

    def card(self) -> str:
        """Read the served model (name, folder, max_model_len) once; returns its folder."""
        if self.model is None:
            card = self.call("/v1/models")["data"][0]
            self.model, self.root = card["id"], card.get("root") or card["id"]
            self.max_model_len = card.get("max_model_len")
        return self.root

    def connect(self, tokenizer, model_name: str = "", teacher_tokenizer=None) -> str:
        """Read the served model and refuse a teacher that is not the one expected.

        Local teacher (its model folder is readable here): the tokenizer fingerprint of that
        folder against the student's. Remote teacher: the model name the server reports (its
        served name or its model path) against `model_name`, when one is given. Both: the ids
        the server's own tokenizer gives a probe text rendered with the student's chat
        template. Returns a one-line description that says which checks ran.

        teacher_tokenizer: a teacher of another tokenizer (train/onpolicy_crosstok.py): the
        same checks against that tokenizer (its fingerprint, its chat template) instead of
        the student's.
        """
        self.card()
        if teacher_tokenizer is not None:
            tokenizer = teacher_tokenizer
        local = self.root_is_local()
        ran = []
        if local:
            # transformers' tokenizers take seconds to import; train imports this module at
            # start (`python -m train --help`), and remote teachers never need them
            from transformers import AutoTokenizer

            theirs = tokenizer_fingerprint(AutoTokenizer.from_pretrained(self.root))
            ours = tokenizer_fingerprint(tokenizer)
            if theirs != ours:
                whose = "the student's" if teacher_tokenizer is None else "the teacher tokenizer's"
                raise TeacherMismatch(
                    f"teacher {self.root} served at {self.url} has tokenizer fingerprint "
                    f"{theirs}, {whose} is {ours}: refusing to distil across tokenizers"
                )
            ran.append("fingerprint ok")
        elif model_name:
            if model_name not in (self.model, self.root):
                raise TeacherMismatch(
                    f"teacher at {self.url} serves model {self.model!r} (path {self.root!r}), "
                    f"not {model_name!r}: refusing an unknown teacher (if it is the same "
                    "model, set onpolicy.teacher_model to the name the server reports)"
                )
            ran.append("model name ok")
        else:
            ran.append("model name not checked (none given)")
        probe = PROBE
        if tokenizer.chat_template:
            chat = [{"role": "user", "content": PROBE}, {"role": "assistant", "content": "42"}]
            probe = tokenizer.apply_chat_template(chat, tokenize=False)
        body = {"model": self.model, "prompt": probe, "add_special_tokens": False}
        theirs = self.call("/tokenize", body)["tokens"]
        ours = tokenizer(probe, add_special_tokens=False)["input_ids"]
        if list(theirs) != list(ours):
            if teacher_tokenizer is None:
                why = (
                    "the student ({} vs {} ids): refusing to distil across tokenizers; for a "
                    "teacher of another tokenizer set onpolicy.teacher_tokenizer to its folder"
                )
            else:
                why = "the teacher tokenizer found here ({} vs {} ids): not the server's tokenizer"
            raise TeacherMismatch(
                f"teacher {self.model} at {self.url} tokenizes a probe text differently from "
                + why.format(len(theirs), len(ours))
            )
        ran.append("tokenizer probe ok")
        where = "local" if local else "remote"
        return f"teacher {self.model} at {self.url}; teacher identity: {', '.join(ran)} ({where})"

    def root_is_local(self) -> bool:
        """Whether the served model's folder is readable here (same machine or filesystem)."""
        return Path(self.root).is_dir()

    # ---- scoring ---------------------------------------------------------------------------

    def _parse(self, answer: dict, sent: list[int], n_response: int) -> TeacherScore:
        def bad(msg):
            return TeacherAnswerError(f"teacher answer refused: {msg}")

        try:
            choice = answer["choices"][0]
            got_ids = choice.get("prompt_token_ids")
            entries = choice["prompt_logprobs"]
        except (KeyError, IndexError, TypeError) as e:
            raise bad(f"missing field ({e!r})") from e
        if got_ids is None or list(got_ids) != sent:
            raise bad("prompt_token_ids differ from the ids sent")
        if entries is None or len(entries) != len(sent):
            raise bad(f"{0 if entries is None else len(entries)} prompt logprobs for {len(sent)}")
        start = len(sent) - n_response
        # The server's JSON keys are strings: ids back to ints for the shared conversion.
        response = [
            {int(i): float(v["logprob"]) for i, v in entry.items()} if entry else entry
            for entry in entries[start:]
        ]
        try:
            ids, lps, tok = topk_arrays(response, sent[start:], self.k)
        except TopKError as e:
            raise bad(str(e)) from e
        if not (np.isfinite(lps).all() and (lps <= 1e-4).all() and np.isfinite(tok).all()):
            raise bad("non-finite or positive logprobs")
        return TeacherScore(ids, lps, tok)

    def score(self, prompt_ids: list[int], response_ids: list[int]) -> TeacherScore:
        """The teacher's top-k on `response_ids` given `prompt_ids` (teacher forcing)."""
        sent = [int(i) for i in prompt_ids] + [int(i) for i in response_ids]
        body = {
            "model": self.model,
            "prompt": sent,
            "max_tokens": 1,
            "temperature": 0.0,
            "prompt_logprobs": self.k,
            "return_token_ids": True,  # echo the prompt ids, checked against `sent`
        }
        n = len(response_ids)
        return self.call("/v1/completions", body, check=lambda a: self._parse(a, sent, n))

    def submit(self, prompt_ids, response_ids):
        """score() in the thread pool: requests of a batch go out concurrently."""
        return self.pool.submit(self.score, prompt_ids, response_ids)

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)
