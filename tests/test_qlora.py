"""QLoRA (model.quantize): a 4-bit nf4 student with LoRA adapters trains from shards on the
CPU, resumes exactly, and tools.eval evaluates the model that was trained."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.fixtures.tiny_model import build_tiny_model, tiny_model_dir
from tests.precompute_helpers import write_jsonl
from tests.train_helpers import train_tiny, write_teacher_shards
from tools.eval import run as ev
from train.config import ModelConfig, load_config
from train.model import load_student, quantization_config, train_quantized_layers


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return write_teacher_shards(tmp_path_factory.mktemp("shards") / "s", tiny_model_dir())


@pytest.fixture(scope="module")
def student(tmp_path_factory):
    # Other random weights than the teacher's, so there is something to learn.
    return build_tiny_model(tmp_path_factory.mktemp("student") / "m", seed=7)


def run(out, shards, student, *extra):
    return train_tiny(
        "configs/train/skd.yaml", out, student, shards, "model.quantize=4bit",
        "model.lora_rank=8", *extra,
    )  # fmt: skip


def test_4bit_student_has_nf4_layers_and_keeps_them_out_of_its_state(student):
    import bitsandbytes as bnb

    lm, _ = load_student(ModelConfig(path=str(student), quantize="4bit", lora_rank=4), "cpu")
    base = lm.get_base_model().model.layers[0].self_attn.q_proj.base_layer
    assert isinstance(base, bnb.nn.Linear4bit) and base.weight.quant_state.quant_type == "nf4"
    trainable = {n for n, p in lm.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_" in n for n in trainable)
    state = lm.state_dict()
    assert trainable <= set(state)
    # The frozen quantized weights (and their quant-state entries) are rebuilt from
    # model.path, not saved; the norms and embeddings stay.
    assert not [k for k in state if "base_layer.weight" in k]
    assert any(k.endswith("input_layernorm.weight") for k in state)
    before = {k: v.clone() for k, v in state.items()}
    with torch.no_grad():
        for p in lm.parameters():
            if p.requires_grad:
                p.add_(1.0)
    lm.load_state_dict(before, strict=True)  # a missing quantized weight is not an error
    after = lm.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())


def test_8bit_is_refused_on_the_cpu_and_vllm_sampling_of_a_quantized_student():
    refusal = "8bit needs a CUDA GPU; on the CPU use model.quantize=4bit"
    with pytest.raises(ValueError, match=refusal):
        load_student(ModelConfig(path=str(tiny_model_dir()), quantize="8bit"), "cpu")
    over = ["onpolicy.teacher_url=http://t:8000", "onpolicy.sampler=vllm", "model.quantize=4bit"]
    with pytest.raises(ValueError, match="use onpolicy.sampler=hf, or model.quantize=none"):
        load_config("configs/train/onpolicy.yaml", over)


@pytest.mark.slow
def test_qlora_trains_resumes_exactly_and_eval_loads_what_was_trained(tmp_path, shards, student):
    # Evaluation every 3 steps runs the quantized layers in eval mode (where bitsandbytes
    # would repack them for its bf16 CPU kernels) on both sides of the interruption.
    common = ["max_steps=10", "save_every=4", "eval_every=3", f"data.eval_shards={shards}"]
    straight = run(tmp_path / "a", shards, student, *common)
    losses = [r["loss"] for r in straight]
    assert all(torch.isfinite(torch.tensor(losses)))
    assert sum(losses[-3:]) < sum(losses[:3]), losses
    evals = [r["eval_loss"] for r in straight if "eval_loss" in r]
    assert len(evals) == 3 and evals[-1] < evals[0], evals

    run(tmp_path / "b", shards, student, *common, "stop_at=5")
    resumed = run(tmp_path / "b", shards, student, *common, "resume=true")
    # stop_at=5 saved step 5; the resumed job goes on from there.
    assert [r["step"] for r in resumed] == list(range(1, 11))
    assert [r["tokens"] for r in resumed] == [r["tokens"] for r in straight]
    # The resumed run quantizes model.path again, bit for bit the weights the first run had
    # (and had kept through its evaluations): the losses match as tightly as full-precision
    # resumes do; rel=1e-6 leaves room for float32 summation order only.
    want = [r["loss"] for r in straight]
    assert [r["loss"] for r in resumed] == pytest.approx(want, rel=1e-6)

    # tools.eval merges the adapter into the dequantized 4-bit base: the merged model computes
    # what the trained model did (merging into the full-precision base would not).
    model_dir, run_dir = ev.resolve_path(str(tmp_path / "a"))
    assert run_dir == str(tmp_path / "a") and ev.adapter_quantization(model_dir) == "4bit"
    merged = ev.merged_lora(model_dir, tmp_path / "cache")
    assert merged == ev.merged_lora(model_dir, tmp_path / "cache")  # cached
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(
        student,
        dtype=torch.float32,
        quantization_config=quantization_config("4bit", "auto", torch.device("cpu")),
        device_map={"": "cpu"},
    )
    train_quantized_layers(base)  # eval mode computes as training did (no bf16 repacking)
    trained = PeftModel.from_pretrained(base, model_dir).eval()
    flat = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32).eval()
    ids = torch.tensor([list(range(3, 40))])
    with torch.no_grad():
        want, got = trained(input_ids=ids).logits, flat(input_ids=ids).logits
        full = PeftModel.from_pretrained(
            AutoModelForCausalLM.from_pretrained(student, dtype=torch.float32), model_dir
        )(input_ids=ids).logits
    assert (got - want).abs().max() < 1e-4 * want.abs().max()
    assert (full - want).abs().max() > 100 * (got - want).abs().max()

    # The whole tools.eval command on the run folder: it loads the result and generates.
    rows = [
        {"id": f"q{i}", "question": f"What is {i} + 2?", "answer": str(i + 2), "task": "arith"}
        for i in range(3)
    ]
    data = write_jsonl(tmp_path / "test.jsonl", rows)
    cfg = tmp_path / "precompute.yaml"
    cfg.write_text(f"teacher: {tiny_model_dir()}\nbackend: hf\nk: 8\nprogress: false\n")
    ev.main(
        ["--config", str(cfg), "--data", str(data), "--out", str(tmp_path / "rep"),
         "--backend", "hf", "--max-tokens", "6", "--model", f"qlora={tmp_path / 'a'}"]
    )  # fmt: skip
    doc = json.loads((tmp_path / "rep" / "results.json").read_text())
    (row,) = doc["models"]
    assert row["name"] == "qlora" and row["tasks"]["arith"]["n"] == 3
    assert len(row["examples"]) == 3 and Path(row["model_dir"]).name == Path(merged).name
