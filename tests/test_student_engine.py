"""The colocated vLLM student engine (vllm_engine/student.py): weight sync and sampling.

One engine for the module (tiny model, float32, in this process). The trainer's model is
trained a few steps; before the push the engine's logprobs of a fixed sequence must differ
from the trainer's, after it they must equal a float64 reference of the trainer's weights
to 1e-4, for full weights and for merged LoRA.
"""

from __future__ import annotations

import copy
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from tests.fixtures.tiny_model import tiny_model_dir
from train.onpolicy import sample_seed

AGREE = 1e-4
SEQ = [5, 17, 99, 3, 250, 42, 7, 7, 130, 61, 18, 300, 2, 77, 141, 9]


@pytest.fixture(scope="module")
def tiny():
    return tiny_model_dir()


@pytest.fixture(scope="module")
def engine(tiny):
    pytest.importorskip("vllm")
    from vllm_engine.student import VLLMStudent

    e = VLLMStudent(tiny, dtype="float32", max_model_len=256, seed=0, cpu_kv_cache_gib=0.25)
    yield e
    e.close()


def load(tiny):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny, dtype=torch.float32)


def train_steps(lm, steps=3, lr=1e-2):
    """A few AdamW steps of next-token loss on random ids: the weights move well past 1e-4."""
    params = [p for p in lm.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr)
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        ids = torch.randint(3, 400, (4, 24), generator=g)
        lm(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()


def reference_logprobs(lm) -> torch.Tensor:
    """log p(SEQ[j] | SEQ[:j]) from a float64 copy of `lm`. Shape: (T-1,)"""
    ref = copy.deepcopy(lm).double().eval()
    with torch.no_grad():
        logits = ref(torch.tensor([SEQ])).logits[0]
    lp = torch.log_softmax(logits, -1)[:-1]
    return lp.gather(1, torch.tensor(SEQ[1:])[:, None])[:, 0].float()


def test_trainer_weights_are_the_checkpoint_names_and_lora_is_merged(tiny):
    """No engine: the pushed tensors are named as in the model folder, and for LoRA each
    adapted weight is W + scale * B @ A (peft's own merge, in float64, as the reference)."""
    from peft import LoraConfig, get_peft_model

    from vllm_engine.student import trainer_weights

    lm = load(tiny)
    assert [n for n, _ in trainer_weights(lm)] == [n for n, _ in lm.named_parameters()]
    peft = get_peft_model(load(tiny), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"]))
    with torch.no_grad():
        for n, p in peft.named_parameters():
            if "lora_" in n:
                p.normal_(0, 0.1)
    ref = copy.deepcopy(peft).double().merge_and_unload()
    got = dict(trainer_weights(peft))
    assert list(got) == [n for n, _ in ref.named_parameters()]
    assert any("q_proj" in n for n in got) and not any("lora_" in n for n in got)
    for n, p in ref.named_parameters():
        torch.testing.assert_close(got[n].double(), p, atol=1e-6, rtol=0)
    assert (
        got["model.layers.0.self_attn.q_proj.weight"]
        - load(tiny).state_dict()["model.layers.0.self_attn.q_proj.weight"]
    ).abs().max() > 1e-3  # the merge did something


@pytest.mark.slow
def test_pushed_weights_give_the_trainers_logprobs(engine, tiny):
    from vllm_engine.student import trainer_weights

    lm = load(tiny)
    start = reference_logprobs(lm)
    torch.testing.assert_close(engine.token_logprobs(SEQ), start, atol=AGREE, rtol=0)
    train_steps(lm)
    trained = reference_logprobs(lm)
    before = engine.token_logprobs(SEQ)
    assert (before - trained).abs().max() > 100 * AGREE  # the test can fail: weights moved
    engine.push(trainer_weights(lm))
    torch.testing.assert_close(engine.token_logprobs(SEQ), trained, atol=AGREE, rtol=0)
    engine.push(trainer_weights(load(tiny)))  # back to the folder's weights, for the others
    torch.testing.assert_close(engine.token_logprobs(SEQ), start, atol=AGREE, rtol=0)


@pytest.mark.slow
def test_lora_pushes_merged_weights_without_touching_the_trainers(engine, tiny):
    from peft import LoraConfig, get_peft_model

    from vllm_engine.student import trainer_weights

    lm = get_peft_model(
        load(tiny), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"])
    )
    train_steps(lm, lr=5e-2)
    base_before = {n: p.clone() for n, p in lm.named_parameters() if "lora_" not in n}
    merged = copy.deepcopy(lm).merge_and_unload()
    want = reference_logprobs(merged)
    names = [n for n, _ in trainer_weights(lm)]
    assert names == [n for n, _ in merged.named_parameters()]
    assert (engine.token_logprobs(SEQ) - want).abs().max() > 100 * AGREE
    engine.push(trainer_weights(lm))
    torch.testing.assert_close(engine.token_logprobs(SEQ), want, atol=AGREE, rtol=0)
    for n, p in lm.named_parameters():  # merging for the push left the trainer's model alone
        if "lora_" not in n:
            assert torch.equal(p, base_before[n]), n
    engine.push(trainer_weights(load(tiny)))


@pytest.mark.slow
def test_samples_are_seeded_per_sample_whatever_the_batch(engine):
    kw = {"temperature": 1.0, "top_p": 1.0, "stop_ids": [2]}
    prompts = [SEQ[:5], SEQ[:9], SEQ[:3]]
    seeds = [sample_seed(0, 4, 1, j) for j in range(3)]
    a = engine.generate(prompts, seeds, max_new_tokens=[12, 12, 12], **kw)
    b = engine.generate(prompts[::-1], seeds[::-1], max_new_tokens=[12, 12, 12], **kw)
    c = engine.generate(prompts[1:2], seeds[1:2], max_new_tokens=[12], **kw)
    assert a == b[::-1] and a[1] == c[0]
    other = engine.generate(prompts, [s + 1 for s in seeds], max_new_tokens=[12] * 3, **kw)
    assert other != a
    for t in a:  # cut at the stop token, which is kept
        assert 1 <= len(t) <= 12 and (len(t) == 12 or t[-1] == 2) and 2 not in t[:-1]


CHILD = """
import sys, time
from vllm_engine.student import VLLMStudent
e = VLLMStudent(sys.argv[1], dtype="float32", max_model_len=128, cpu_kv_cache_gib=0.25)
print("ready", flush=True)
time.sleep(600)
"""


@pytest.mark.slow
def test_kill_9_of_the_trainer_leaves_no_engine_process(tiny, tmp_path):
    """Issue 15 item 3: EngineCore and its worker run in the trainer's process, so a
    SIGKILL of that process leaves nothing behind."""
    pytest.importorskip("vllm")
    psutil = pytest.importorskip("psutil")
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    proc = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(tiny)],
        stdout=subprocess.PIPE,
        stderr=open(tmp_path / "child.log", "w"),
        env=env,
        text=True,
    )
    try:
        # vLLM logs to stdout too: wait for our line.
        assert any(line.strip() == "ready" for line in proc.stdout), (
            tmp_path / "child.log"
        ).read_text()
        children = psutil.Process(proc.pid).children(recursive=True)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        time.sleep(5)
        alive = [c for c in children if c.is_running() and c.status() != psutil.STATUS_ZOMBIE]
        assert not alive, [c.cmdline() for c in alive]
    finally:
        if proc.poll() is None:
            proc.kill()
