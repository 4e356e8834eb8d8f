"""tools/gemma_model.py's chat format, on a small word-level tokenizer with Gemma's markers
(the real GGUF is 253 MB: its conversion runs in `make models-gemma`, not here)."""

from __future__ import annotations

import pytest
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import Whitespace
from transformers import GenerationConfig, PreTrainedTokenizerFast

from tools.gemma_model import END_OF_TURN, set_chat_format

MARKERS = ["<pad>", "<eos>", "<bos>", "<start_of_turn>", END_OF_TURN]


def tokenizer(markers=MARKERS) -> PreTrainedTokenizerFast:
    vocab = {t: i for i, t in enumerate([*markers, "[UNK]", "hi", "there"])}
    backend = Tokenizer(WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = Whitespace()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>"
    )
    tok.add_special_tokens({"additional_special_tokens": [m for m in markers if m[0] == "<"]})
    return tok


def test_turns_are_gemma_format_and_the_system_message_opens_the_first_user_turn():
    tok = tokenizer()
    set_chat_format(tok)
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "3+3?"},
    ]
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == (
        "<bos><start_of_turn>user\nBe brief.\n\n2+2?<end_of_turn>\n"
        "<start_of_turn>model\n4<end_of_turn>\n"
        "<start_of_turn>user\n3+3?<end_of_turn>\n"
        "<start_of_turn>model\n"
    )
    plain = tok.apply_chat_template(messages[1:2], tokenize=False, add_generation_prompt=False)
    assert plain == "<bos><start_of_turn>user\n2+2?<end_of_turn>\n"


def test_end_of_turn_becomes_eos_and_the_first_generation_stop():
    tok = tokenizer()
    config = GenerationConfig(eos_token_id=1)
    set_chat_format(tok, config)
    eot = tok.convert_tokens_to_ids(END_OF_TURN)
    assert tok.eos_token == END_OF_TURN and tok.eos_token_id == eot
    assert config.eos_token_id == [eot, 1]  # the base model's own <eos> still stops


def test_a_vocabulary_without_the_turn_markers_is_refused():
    tok = tokenizer(["<pad>", "<eos>", "<bos>"])
    with pytest.raises(ValueError, match="<start_of_turn>"):
        set_chat_format(tok)
