"""Tests for the model builders: tests/fixtures/tiny_model.py and tools/models.py."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from tests.fixtures.tiny_model import (
    CHAT_TEMPLATE,
    EOS_TOKEN,
    PAD_TOKEN,
    VLLM_CPU_HEAD_SIZES,
    build_tiny_model,
    tiny_model_dir,
)
from tools import models as smol

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "model", seed=0)


@pytest.fixture(scope="module")
def tiny_tokenizer(tiny_dir):
    return AutoTokenizer.from_pretrained(tiny_dir)


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / "model.safetensors")


# --- tiny model ---------------------------------------------------------------------


def test_tiny_model_loads_with_transformers(tiny_dir, tiny_tokenizer):
    model = AutoModelForCausalLM.from_pretrained(tiny_dir)
    config = model.config
    assert type(model).__name__ == "Qwen3ForCausalLM"
    assert model.dtype == torch.float32
    assert config.max_position_embeddings >= 2048
    assert config.vocab_size % 64 == 0
    assert config.head_dim in VLLM_CPU_HEAD_SIZES
    assert len(tiny_tokenizer) <= config.vocab_size
    assert sum(p.numel() for p in model.parameters()) < 5_000_000
    assert all(t.dtype == torch.float32 for t in _tensors(tiny_dir).values())

    ids = tiny_tokenizer("What is 2 + 3?", return_tensors="pt").input_ids
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (1, ids.shape[1], config.vocab_size)
    assert torch.isfinite(logits).all()
    # init_std is chosen so next-token distributions are clearly not uniform.
    probs = logits[0, -1].softmax(-1)
    assert probs.max() > 5 / config.vocab_size


def test_tiny_model_special_tokens(tiny_dir, tiny_tokenizer):
    tok = tiny_tokenizer
    assert tok.eos_token == EOS_TOKEN
    assert tok.pad_token == PAD_TOKEN
    for special in ("<|im_start|>", EOS_TOKEN, PAD_TOKEN):
        assert len(tok(special, add_special_tokens=False).input_ids) == 1
    config = json.loads((tiny_dir / "config.json").read_text())
    assert config["eos_token_id"] == tok.eos_token_id
    assert config["pad_token_id"] == tok.pad_token_id
    generation = json.loads((tiny_dir / "generation_config.json").read_text())
    assert tok.eos_token_id in generation["eos_token_id"]


def test_tiny_model_chat_template(tiny_tokenizer):
    tok = tiny_tokenizer
    assert tok.chat_template == CHAT_TEMPLATE
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is 2 + 3?"},
    ]
    rendered = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert rendered == (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\nWhat is 2 + 3?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    no_prompt = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)
    assert no_prompt == rendered.removesuffix("<|im_start|>assistant\n")
    ids = tok.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
    ids = ids["input_ids"] if not isinstance(ids, list) else ids
    assert tok.decode(ids) == rendered


@pytest.mark.parametrize(
    "text",
    [
        "The capital of France is Paris.",
        "  leading and trailing spaces  \n\ttabs\r\nand CRLF",
        "12 + 7 = 19; 3.14159 * 2 = 6.28318",
        "Unicode: naïve café, Ελληνικά, 日本語, emoji 🎉",
        "",
    ],
)
def test_tiny_tokenizer_round_trips(tiny_tokenizer, text):
    ids = tiny_tokenizer(text, add_special_tokens=False).input_ids
    assert tiny_tokenizer.decode(ids) == text


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet=st.characters(exclude_categories=("Cs",)), max_size=200))
def test_tiny_tokenizer_round_trips_any_text(tiny_tokenizer, text):
    # Byte-level BPE has no unknown token: every string must survive encode/decode.
    ids = tiny_tokenizer(text, add_special_tokens=False).input_ids
    assert tiny_tokenizer.decode(ids) == text


def test_tiny_model_is_deterministic(tiny_dir, tmp_path):
    # The second build runs in a fresh process: tokenizer training and weight init must
    # not depend on process-level state such as hash seeds or the global torch RNG.
    again = tmp_path / "again"
    proc = subprocess.run(
        [sys.executable, "-m", "tests.fixtures.tiny_model", str(again), "--seed", "0"],
        cwd=REPO,
        check=True,
        capture_output=True,
        text=True,
    )
    assert proc.stdout == f"{again}\n"  # the CLI's stdout is just the path
    assert (again / "tokenizer.json").read_text() == (tiny_dir / "tokenizer.json").read_text()
    assert (again / "config.json").read_text() == (tiny_dir / "config.json").read_text()
    first, second = _tensors(tiny_dir), _tensors(again)
    assert first.keys() == second.keys()
    for name in first:
        assert torch.equal(first[name], second[name]), name

    other = _tensors(build_tiny_model(tmp_path / "seed1", seed=1))
    assert not torch.equal(first["model.embed_tokens.weight"], other["model.embed_tokens.weight"])


def test_tiny_model_rejects_unsupported_shapes(tmp_path):
    with pytest.raises(ValueError, match="head_dim"):
        build_tiny_model(tmp_path / "a", head_dim=16)
    with pytest.raises(ValueError, match="multiple of 64"):
        build_tiny_model(tmp_path / "b", vocab_size=500)
    with pytest.raises(ValueError, match="kv_heads"):
        build_tiny_model(tmp_path / "c", heads=4, kv_heads=3)


def test_tiny_model_dir_is_cached(tmp_path, monkeypatch):
    first = tiny_model_dir(cache_dir=tmp_path, seed=3)
    assert (first / "tiny_model.json").is_file()
    assert not list(tmp_path.glob("*.partial"))
    assert AutoModelForCausalLM.from_pretrained(first).config.num_hidden_layers == 2

    def fail(*args, **kwargs):
        raise AssertionError("cached model was rebuilt")

    monkeypatch.setattr("tests.fixtures.tiny_model.build_tiny_model", fail)
    assert tiny_model_dir(cache_dir=tmp_path, seed=3) == first
    # Explicit defaults name the same build.
    assert tiny_model_dir(cache_dir=tmp_path, seed=3, layers=2, vocab_size=512) == first
    with pytest.raises(TypeError):
        tiny_model_dir(cache_dir=tmp_path, no_such_param=1)
    with pytest.raises(AssertionError, match="rebuilt"):
        tiny_model_dir(cache_dir=tmp_path, seed=4)
    # The failed build left nothing behind that could pass for a finished one.
    assert sorted(p.name for p in tmp_path.iterdir()) == [first.name]


# --- SmolLM2 conversion helpers, exercised on tiny models -----------------------------


def test_student_layers():
    assert smol.student_layers(30) == [0, 3, 6, 9, 12, 15, 18, 21, 24, 27]
    assert smol.student_layers(7, 3) == [0, 3, 6]
    with pytest.raises(ValueError):
        smol.student_layers(4, 0)


def test_derive_student_copies_kept_layers(tmp_path):
    teacher_dir = build_tiny_model(tmp_path / "teacher", layers=7, seed=5)
    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir)
    student, kept = smol.derive_student(teacher, stride=3)
    assert kept == [0, 3, 6]
    assert student.config.num_hidden_layers == 3
    assert len(student.model.layers) == 3
    assert len(student.config.layer_types) == 3
    t_state, s_state = teacher.state_dict(), student.state_dict()
    for new, old in enumerate(kept):
        for suffix in ("self_attn.q_proj.weight", "mlp.down_proj.weight", "input_layernorm.weight"):
            assert torch.equal(
                s_state[f"model.layers.{new}.{suffix}"], t_state[f"model.layers.{old}.{suffix}"]
            )
    assert torch.equal(s_state["model.embed_tokens.weight"], t_state["model.embed_tokens.weight"])
    # The student's per-layer attention index must match its new position (KV cache).
    assert [layer.self_attn.layer_idx for layer in student.model.layers] == [0, 1, 2]
    ids = torch.tensor([[1, 5, 9, 42]])
    with torch.no_grad():
        out = student.generate(ids, max_new_tokens=4, do_sample=False)
    assert out.shape == (1, 8)


def test_save_model_dir_is_atomic_and_detects_stale_builds(tmp_path, tiny_dir, tiny_tokenizer):
    model = AutoModelForCausalLM.from_pretrained(tiny_dir)
    folder = tmp_path / "out"
    info = {"format": smol.BUILD_FORMAT, "source_sha256": "abc", "layers_kept": [0, 1]}

    # A folder left by an interrupted build (no build_info.json) is not complete.
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    assert not smol.is_complete(folder, "abc")

    smol.save_model_dir(folder, model, tiny_tokenizer, info)
    assert smol.is_complete(folder, "abc")
    assert not smol.is_complete(folder, "other-sha")
    assert smol.read_build_info(folder)["layers_kept"] == [0, 1]
    assert AutoTokenizer.from_pretrained(folder).chat_template == CHAT_TEMPLATE
    assert not [p.name for p in tmp_path.iterdir() if p.name != "out"]

    (folder / "build_info.json").write_text(json.dumps({**info, "format": -1}))
    assert not smol.is_complete(folder, "abc")


# --- the real SmolLM2 GGUF -------------------------------------------------------------


@pytest.fixture(scope="module")
def smollm2():
    model, tokenizer = smol.load_teacher(smol.find_gguf())
    return model, tokenizer


def test_smollm2_teacher_converts(smollm2):
    model, tokenizer = smollm2
    assert model.config.num_hidden_layers == 30
    assert model.dtype == torch.float32
    assert not hasattr(model.config, "quantization_config")
    assert "<|im_start|>" in tokenizer.chat_template
    assert "Paris" in smol.greedy_answer(model, tokenizer, "What is the capital of France?")


def test_smollm2_student_derivation(smollm2, tmp_path):
    teacher, tokenizer = smollm2
    student, kept = smol.derive_student(teacher)
    assert kept == list(range(0, 30, 3))
    assert student.config.num_hidden_layers == 10

    folder = tmp_path / smol.STUDENT_NAME
    info = {"format": smol.BUILD_FORMAT, "source_sha256": "x", "layers_kept": kept}
    smol.save_model_dir(folder, student, tokenizer, info)
    reloaded = AutoModelForCausalLM.from_pretrained(folder)
    assert reloaded.config.num_hidden_layers == 10
    assert AutoTokenizer.from_pretrained(folder).chat_template == tokenizer.chat_template
    ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        logits = reloaded(ids).logits
    assert torch.isfinite(logits).all()
