"""Shared by the precompute tests: a small question set and configs on the tiny model."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from precompute.config import load_config
from shards.reader import ShardFolder

K = 8
MAX_LEN = 256


def write_jsonl(path: Path, rows: list) -> Path:
    with open(path, "w") as f:
        for r in rows:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
    return path


def questions(n: int = 12) -> list[dict]:
    return [
        {
            "question": f"What is {i} + {i + 3}?",
            "experience": "Add the two numbers." if i % 2 else None,
            "answer": f"{i} + {i + 3} = {2 * i + 3}.",
        }
        for i in range(n)
    ]


def cfg(teacher: Path, data: Path, out: Path, *overrides: str):
    return load_config(
        None,
        [
            f"teacher={teacher}",
            f"data.path={data}",
            f"out={out}",
            f"k={K}",
            "sampling.max_tokens=12",
            f"engine.max_model_len={MAX_LEN}",
            "commit_every=4",
            "progress=false",
            *overrides,
        ],
    )


def all_rows(folder: Path) -> list[dict]:
    """Every row of a folder, after verifying each file against the manifest."""
    sf = ShardFolder(folder)
    rows = []
    for fi, entry in enumerate(sf.manifest.files):
        sf.verify_file(fi)
        for bi in range(len(entry.batch_rows)):
            block = sf.read_block(fi, bi)
            rows.extend({**block.row(i), "file": entry.name} for i in range(len(block)))
    return rows


def hf_logprobs(model, prompt, response) -> np.ndarray:
    """(T, V) float32 log_softmax of the transformers model teacher-forced on the response."""
    import torch

    ids = torch.tensor([list(prompt) + list(response)])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0].float()
    lp = torch.log_softmax(logits, dim=-1)
    return lp[len(prompt) - 1 : len(prompt) + len(response) - 1].numpy()


def kill_after_first_commit(worker: int, events: list):
    """A precompute job's on_event hook: SIGKILLs `worker`'s process once, after its first
    commit; records every event in `events` and the killing one in `hook.killed`."""
    import os
    import signal

    def hook(ev):
        if ev["worker"] == worker and ev["summary"]["examples"] > 0 and not hook.killed:
            os.kill(ev["pid"], signal.SIGKILL)
            hook.killed.append(ev)
        events.append(ev)

    hook.killed = []
    return hook


# A chat template that behaves as Qwen3's does where it matters for conversations (written
# here, not Qwen's): assistant turns before the last user turn lose their reasoning
# (`<think>...</think>`), the last assistant turn after it without reasoning gets an empty
# think block, tool calls are rendered after the content, and enable_thinking=false ends the
# generation prompt with an empty think block. The tiny tokenizer's EOS ends every turn.
QWEN3_LIKE_TEMPLATE = (
    "{%- set ns = namespace(last_user=-1) -%}"
    "{%- for m in messages -%}{%- if m.role == 'user' -%}{%- set ns.last_user = loop.index0 -%}"
    "{%- endif -%}{%- endfor -%}"
    "{%- for m in messages -%}"
    "{{- '<|im_start|>' + m.role + '\\n' -}}"
    "{%- set text = m.content -%}"
    "{%- if m.role == 'assistant' and loop.index0 < ns.last_user and '</think>' in text -%}"
    "{%- set text = text.split('</think>')[-1].lstrip('\\n') -%}"
    "{%- elif m.role == 'assistant' and loop.last and '</think>' not in text -%}"
    "{%- set text = '<think>\\n\\n</think>\\n\\n' + text -%}"
    "{%- endif -%}"
    "{{- text -}}"
    "{%- for call in (m.tool_calls or []) -%}"
    "{{- '\\n<tool_call>' + call.function.name + ' ' -}}"
    "{%- if call.function.arguments is string -%}{{- call.function.arguments -}}"
    "{%- else -%}{{- call.function.arguments | tojson -}}{%- endif -%}"
    "{{- '</tool_call>' -}}"
    "{%- endfor -%}"
    "{{- '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}"
    "{%- if enable_thinking is defined and not enable_thinking -%}"
    "{{- '<think>\\n\\n</think>\\n\\n' -}}{%- endif -%}{%- endif -%}"
)


def with_template(tiny: Path, folder: Path, template: str) -> Path:
    """A copy of the model folder `tiny` whose tokenizer has another chat template."""
    import shutil

    shutil.copytree(tiny, folder)
    (folder / "chat_template.jinja").write_text(template)
    return folder


def conversation(i: int, turns: int = 3) -> list[dict]:
    """A `turns`-turn conversation: a system message, then user/assistant pairs."""
    msgs = [{"role": "system", "content": "Answer in one short sentence."}]
    for t in range(turns):
        msgs.append({"role": "user", "content": f"What is {i} + {t}?"})
        msgs.append({"role": "assistant", "content": f"{i} + {t} = {i + t}."})
    return msgs


def other_tokenizer_student(tiny: Path, out: Path) -> Path:
    """A student model folder whose tokenizer differs from the tiny teacher's (another BPE
    with fewer merges, another chat template): precompute writes teacher-vocabulary shards."""
    import shutil

    from tests.fixtures.tiny_model import train_tokenizer

    out.mkdir(parents=True, exist_ok=True)
    shutil.copy(tiny / "config.json", out / "config.json")
    tok = train_tokenizer(vocab_size=384)
    tok.chat_template = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
    tok.save_pretrained(out)
    return out
