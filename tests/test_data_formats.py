"""Data as Hugging Face and TRL users have it: each format recognised from its columns and
mapped to the student's prompt, the teacher's, the answer and the response to score
(datafiles/formats.py); tables of no known format and bad rows refused in one line each; the
same reading in precompute, tools.eval and on-policy prompts."""

from __future__ import annotations

import pytest

from datafiles.formats import Fields, read_examples
from datafiles.reading import InputFileError
from precompute.config import load_config
from precompute.hf_backend import HFBackend
from precompute.inputs import read_examples as precompute_examples
from precompute.run import run
from tests.fixtures.tiny_model import tiny_model_dir
from tests.precompute_helpers import K, all_rows, cfg, write_jsonl

SYS = {"role": "system", "content": "Be brief."}
USER = {"role": "user", "content": "What is 2 + 2?"}
BOT = {"role": "assistant", "content": "2 + 2 = 4."}

# (row, student chat, answer, score-mode response); experience and id ride along.
CASES = {
    "question_answer": ({"question": USER["content"], "answer": "4"}, [USER], "4", "4"),
    "messages": ({"messages": [SYS, USER, BOT]}, [SYS, USER], BOT["content"], BOT["content"]),
    "standard prompt-completion": (
        {"prompt": USER["content"], "completion": BOT["content"]},
        [USER],
        BOT["content"],
        BOT["content"],
    ),
    "conversational prompt-completion": (
        {"prompt": [SYS, USER], "completion": [BOT]},
        [SYS, USER],
        BOT["content"],
        BOT["content"],
    ),
    # A reference answer beside a completion: the answer is the answer, the completion
    # is what is scored.
    "prompt-completion with an answer": (
        {"prompt": USER["content"], "completion": BOT["content"], "answer": "4"},
        [USER],
        "4",
        BOT["content"],
    ),
}
PROMPT_ONLY = {
    "standard prompt-only": ({"prompt": USER["content"]}, [USER]),
    "conversational prompt-only": ({"prompt": [SYS, USER]}, [SYS, USER]),
}


def write_parquet(path, rows):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def write(tmp_path, rows, suffix):
    path = tmp_path / f"data.{suffix}"
    return write_jsonl(path, rows) if suffix == "jsonl" else write_parquet(path, rows)


@pytest.mark.parametrize("suffix", ["jsonl", "parquet"])
@pytest.mark.parametrize("case", list(CASES))
def test_each_format_is_recognised_and_mapped(tmp_path, case, suffix):
    row, chat, answer, response = CASES[case]
    rows = [{**row, "experience": "Add.", "id": "a"}, {**row, "id": "b"}]
    path = write(tmp_path, rows, suffix)
    examples, rejects, total = read_examples(path, "train", Fields(), "score")
    assert rejects == [] and total == 2
    for ex, e in zip(examples, ["Add.", ""], strict=True):
        assert list(ex.messages) == chat
        assert (ex.answer, ex.response, ex.experience) == (answer, response, e)
    assert [ex.id for ex in examples] == ["a", "b"]


@pytest.mark.parametrize("case", list(PROMPT_ONLY))
def test_prompt_only_rows_generate_and_have_nothing_to_score(tmp_path, case):
    row, chat = PROMPT_ONLY[case]
    path = write_jsonl(tmp_path / "p.jsonl", [row])
    (ex,), rejects, _ = read_examples(path, "train", Fields(), "generate")
    assert rejects == [] and list(ex.messages) == chat and ex.answer is None
    _, rejects, _ = read_examples(path, "train", Fields(), "score")
    assert [r.message() for r in rejects] == [
        f"{path}:1: completion: score mode needs a non-empty response to score"
    ]


def test_a_table_of_no_known_format_is_refused_in_one_line(tmp_path):
    path = write_jsonl(tmp_path / "x.jsonl", [{"input": "a?", "output": "b"}])
    with pytest.raises(InputFileError) as e:
        read_examples(path, "train", Fields(), "generate")
    assert str(e.value) == (
        f"{path}: no known format: columns [input, output]; looked for: question(+answer) | "
        "messages | prompt(+completion); or name them with data.format and data.*_field"
    )
    csv = tmp_path / "t.csv"
    csv.write_text("text,source\nhello world,web\n")
    with pytest.raises(InputFileError, match=r"columns \[text, source\].*`text` is language"):
        read_examples(csv, "train", Fields(), "generate")


def test_settings_win_over_the_columns(tmp_path):
    rows = [{"question": "q?", "prompt": "p?", "completion": "c", "messages": [USER]}]
    path = write_parquet(tmp_path / "all.parquet", rows)

    def chat(*overrides):
        c = load_config(None, [f"data.path={path}", *overrides])
        (ex,), rejects, _ = precompute_examples(c.data, "generate")
        assert rejects == []
        return ex.messages[0]["content"]

    assert chat() == "q?"  # kdshards' own format first, as before the formats were read
    assert chat("data.format=prompt_completion") == "p?"
    assert chat("data.format=messages") == USER["content"]
    assert chat("data.messages_field=messages") == USER["content"]
    only = write_parquet(tmp_path / "m.parquet", [{"messages": [USER], "prompt": "p?"}])
    assert chat(f"data.path={only}") == USER["content"]  # messages before prompt
    c = load_config(None, [f"data.path={only}", "data.question_field=q"])
    with pytest.raises(InputFileError, match="no column 'q' \\(format question_answer, from"):
        precompute_examples(c.data, "generate")
    with pytest.raises(ValueError, match="data.format"):
        load_config(None, ["data.format=alpaca"])


def test_bad_rows_name_file_line_and_field(tmp_path):
    path = write_jsonl(
        tmp_path / "pc.jsonl",
        [
            "{not json",  # the format is read from the first object, the next line
            {"prompt": "ok?", "completion": "yes"},
            {"prompt": 3, "completion": "x"},
            {"prompt": [USER, BOT], "completion": "x"},
            {"prompt": [{"role": "user"}], "completion": "x"},
            {"prompt": "p?", "completion": [BOT, BOT]},
            {"prompt": "p?", "completion": 7},
            {"completion": "no prompt"},
            {"prompt": "  ", "completion": "x"},
        ],
    )
    examples, rejects, total = read_examples(path, "train", Fields(), "generate")
    assert total == 9 and [ex.messages[0]["content"] for ex in examples] == ["ok?"]
    assert [r.message() for r in rejects] == [
        f"{path}:1: <json>: not valid JSON: Expecting property name enclosed in double quotes",
        f"{path}:3: prompt: expected a string, got int",
        f"{path}:4: prompt: ends with an assistant turn: the response belongs in the completion",
        f"{path}:5: prompt[0]: expected {{role: str, content: str}}",
        f"{path}:6: completion: expected one assistant message",
        f"{path}:7: completion: expected a string or messages, got int",
        f"{path}:8: prompt: missing",
        f"{path}:9: prompt: empty",
    ]


def test_a_folder_reads_each_file_in_its_own_format(tmp_path):
    folder = tmp_path / "d"
    folder.mkdir()
    write_jsonl(folder / "a.jsonl", [{"question": "a?"}])
    write_jsonl(folder / "b.jsonl", [{"prompt": [USER]}])
    write_jsonl(folder / "c.jsonl", [{"messages": [USER, BOT]}])
    examples, rejects, _ = read_examples(folder, "train", Fields(), "generate")
    assert rejects == []
    assert [ex.messages[-1]["content"] for ex in examples] == ["a?"] + [USER["content"]] * 2
    assert [ex.prompt_field for ex in examples] == ["question", "prompt", "messages"]


# ---- precompute: the tokens of both views and of the scored response ------------------------


@pytest.fixture(scope="module")
def tiny():
    return tiny_model_dir()


@pytest.mark.parametrize("case", list(CASES))
def test_precompute_scores_each_format_with_the_right_tokens(tiny, tmp_path, case):
    """Score mode on the tiny model: prompt ids are the chat template of the student's chat,
    the teacher's add the experience, the response is the completion's tokens and EOS."""
    from transformers import AutoTokenizer

    row, chat, _, response = CASES[case]
    path = write_jsonl(tmp_path / "d.jsonl", [{**row, "experience": "Add the numbers."}])
    out = tmp_path / "out"
    c = cfg(tiny, path, out, "mode=score", "view.experience_position=prefix")
    run(c, HFBackend(str(tiny), K))
    (shard_row,) = all_rows(out)
    tok = AutoTokenizer.from_pretrained(tiny)

    def ids(messages):  # written out here, not datafiles.views.render
        text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return tok(text, add_special_tokens=False)["input_ids"]

    teacher_chat = [dict(m) for m in chat]
    teacher_chat[-1]["content"] = "Add the numbers.\n\n" + teacher_chat[-1]["content"]
    assert list(shard_row["prompt_ids"]) == ids(chat)
    assert list(shard_row["teacher_prompt_ids"]) == ids(teacher_chat)
    expected = tok(response, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert list(shard_row["response_ids"]) == expected


# ---- tools.eval ---------------------------------------------------------------------------


@pytest.mark.parametrize("case", list(CASES))
def test_eval_reads_each_format(tmp_path, case):
    from tools.eval import run as ev

    row, chat, answer, _ = CASES[case]
    path = write_jsonl(tmp_path / "test.jsonl", [row])
    _, (ex,), raws = ev.load_examples("configs/precompute.yaml", str(path), 0)
    assert list(ex.messages) == chat and ex.answer == answer
    # Every case's answer ends in 4: the final number is matched.
    assert ev.score(raws[ex.index], ex.answer, "The answer is 4.", 1.0) == ("exact_match", 1.0)
    assert ev.score(raws[ex.index], ex.answer, "The answer is 5.", 1.0) == ("exact_match", 0.0)


# ---- on-policy prompts from a data file (training against a server: test_onpolicy.py) ------


def prompt_rows(n):
    return [
        {"prompt": [SYS, {"role": "user", "content": f"What is {i} + 1?"}], "experience": "Add."}
        if i % 2
        else {"prompt": f"What is {i} + 1?"}
        for i in range(n)
    ]


def test_prompt_batches_render_both_views_and_cover_each_epoch(tiny, tmp_path):
    from transformers import AutoTokenizer

    from train.prompts import PromptBatches

    tok = AutoTokenizer.from_pretrained(tiny)
    path = write_jsonl(tmp_path / "p.jsonl", prompt_rows(7))

    def ids(messages):
        text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return tok(text, add_special_tokens=False)["input_ids"]

    src = PromptBatches(path, tok, max_rows=3, max_length=512, seed=1)
    by_id = {}
    batches = iter(src)
    for _ in range(3):  # one epoch: 3 + 3 + 1 prompts
        b = next(batches)
        assert b.num_tokens == 0 and len(b.ids) == len(b.prompt_ids) <= 3
        for i, p, t in zip(b.ids, b.prompt_ids, b.teacher_prompt_ids, strict=True):
            by_id[i] = (p.tolist(), t.tolist())
    assert len(by_id) == 7
    for ex in src.examples:
        chat = list(ex.messages)
        p, t = by_id[ex.id]
        assert p == ids(chat)
        if ex.experience:  # the system message gets the experience after a blank line
            teacher = [{**chat[0], "content": chat[0]["content"] + "\n\nAdd."}, *chat[1:]]
            assert t == ids(teacher) and t != p
        else:
            assert t == p
    # Two ranks split the rows; a rank's order differs per epoch.
    r0 = PromptBatches(path, tok, max_rows=8, max_length=512, rank=0, world_size=2)
    r1 = PromptBatches(path, tok, max_rows=8, max_length=512, rank=1, world_size=2)
    assert sorted(r0.ids + r1.ids) == sorted(src.ids) and not set(r0.ids) & set(r1.ids)
    it = iter(r0)
    first, second = next(it).ids, next(it).ids
    assert sorted(first) == sorted(second) and first != second


def test_prompt_batches_resume_where_the_trainer_stopped(tiny, tmp_path):
    from transformers import AutoTokenizer

    from train.prompts import PromptBatches

    tok = AutoTokenizer.from_pretrained(tiny)
    path = write_jsonl(tmp_path / "p.jsonl", prompt_rows(5))
    src = PromptBatches(path, tok, max_rows=2, max_length=512)
    it = iter(src)
    seen = []
    for _ in range(4):  # into the second epoch (3 batches an epoch)
        b = next(it)
        src.update(b)
        seen.append(b.ids)
    again = PromptBatches(path, tok, max_rows=2, max_length=512)
    again.load_state_dict(src.state_dict())
    whole = PromptBatches(path, tok, max_rows=2, max_length=512)
    expected = [b.ids for _, b in zip(range(6), iter(whole), strict=False)]
    assert seen + [b.ids for _, b in zip(range(2), iter(again), strict=False)] == expected


def test_prompt_batches_refuse_bad_rows_and_prompts_without_room(tiny, tmp_path):
    from transformers import AutoTokenizer

    from datafiles.formats import InputError
    from train.prompts import PromptBatches

    tok = AutoTokenizer.from_pretrained(tiny)
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "a?"}, {"prompt": 5}])
    with pytest.raises(InputError, match=f"{path}:2: prompt: expected a string, got int"):
        PromptBatches(path, tok, max_rows=2, max_length=512)
    path = write_jsonl(tmp_path / "q.jsonl", [{"question": "a?"}, {"question": "b " * 300}])
    src = PromptBatches(path, tok, max_rows=2, max_length=512)
    src.check_room(None)
    with pytest.raises(InputError, match=f"{path}:2: question: teacher view needs"):
        src.check_room(64)


def test_onpolicy_prompts_config_is_checked(tmp_path):
    from train.config import load_config as train_config

    base = ["onpolicy.prompts=p.jsonl", "onpolicy.k=8", "onpolicy.lmbda=1"]
    cfg = train_config("configs/train/onpolicy.yaml", base)
    assert cfg.onpolicy.prompts == "p.jsonl" and cfg.onpolicy.experience_position == "system"
    with pytest.raises(ValueError, match="onpolicy.lmbda=1"):
        train_config("configs/train/onpolicy.yaml", [*base, "onpolicy.lmbda=0.5"])
    with pytest.raises(ValueError, match="set onpolicy.k"):
        train_config("configs/train/onpolicy.yaml", [*base, "onpolicy.k=0"])
    with pytest.raises(ValueError, match="need onpolicy.teacher_url"):
        train_config("configs/train/onpolicy.yaml", [*base, "onpolicy.teacher_url="])
    with pytest.raises(ValueError, match="experience_position"):
        train_config("configs/train/onpolicy.yaml", [*base, "onpolicy.experience_position=top"])


class RecordingTeacher:
    """A stand-in for the teacher server's client: records each request (teacher prompt,
    response) and answers with fixed top-k scores."""

    max_model_len, num_retries = 512, 0

    def __init__(self):
        self.requests = []

    def submit(self, prompt_ids, response_ids):
        from concurrent.futures import Future

        import numpy as np

        from vllm_engine.teacher_client import TeacherScore

        self.requests.append((list(prompt_ids), list(response_ids)))
        t = len(response_ids)
        ids = np.tile(np.arange(K, dtype=np.int64), (t, 1))
        lps = np.full((t, K), np.log(1.0 / (K + 1)), dtype=np.float32)
        future = Future()
        future.set_result(TeacherScore(ids, lps, lps[:, 0].copy()))
        return future

    def close(self):
        pass


def test_onpolicy_batches_sample_on_q_and_are_scored_on_q_plus_e(tiny, tmp_path):
    """OnPolicyBatches over a prompt file: the student samples on its prompt (Q), the
    teacher is asked on Q+E, and the batch trains the samples with the teacher's scores."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from train.config import OnPolicyConfig
    from train.onpolicy import OnPolicyBatches
    from train.prompts import PromptBatches

    tok = AutoTokenizer.from_pretrained(tiny)
    lm = AutoModelForCausalLM.from_pretrained(tiny, dtype=torch.float32)
    path = write_jsonl(tmp_path / "p.jsonl", prompt_rows(5))
    prompts = PromptBatches(path, tok, max_rows=2, max_length=512)
    teacher = RecordingTeacher()
    op = OnPolicyConfig(teacher_url="http://x", max_new_tokens=6, max_prompts=2, k=K)
    src = OnPolicyBatches(
        prompts, teacher, op, student=lambda: lm, tokenizer=tok, seed=0, grad_accum=1,
        max_length=512,
    )  # fmt: skip
    views = {
        tuple(p.tolist()): t.tolist()
        for p, t in zip(prompts.prompt_ids, prompts.teacher_prompt_ids, strict=True)
    }
    batches = iter(src)
    for _ in range(3):  # an epoch of 5 prompts, 2 a batch
        asked = len(teacher.requests)
        batch = next(batches)
        src.update(batch)
        new = teacher.requests[asked:]
        assert len(new) == len(batch.ids) >= 1 and batch.num_tokens > 0
        responses = []
        for b, (teacher_prompt, response) in enumerate(new):
            prompt = batch.prompt_ids[b].tolist()
            assert views[tuple(prompt)] == teacher_prompt  # scored on Q+E
            row = batch.input_ids[b][batch.attention_mask[b].bool()].tolist()
            assert row == prompt + response  # trained on Q + the sample
            responses += response
        assert batch.targets.tolist() == responses
        assert (batch.topk_ids == torch.arange(K)).all()
    assert src.state_dict()["shards"] == {"prompts": str(path), "epoch": 1, "next": 0}


def test_rounds_take_a_trl_prompt_file(tiny, tmp_path):
    """tools.onpolicy.rounds' data steps on a TRL file: the student's samples (precompute, student
    view) become score-mode rows with the file's chat and experience, which the scoring
    step's fixed fields read back."""
    from tools.onpolicy.rounds import parser, write_responses

    rows = prompt_rows(4)
    path = write_jsonl(tmp_path / "p.jsonl", rows)
    samples = tmp_path / "samples"
    run(
        cfg(tiny, path, samples, "generator_view=student", "source=student"),
        HFBackend(str(tiny), K),
    )
    args = parser().parse_args(
        ["--rounds", "1", "--work", str(tmp_path / "w"), "--teacher", str(tiny),
         "--student", str(tiny), "--data", str(path), "--precompute-config", ""]
    )  # fmt: skip
    out = tmp_path / "responses.jsonl"
    assert write_responses(args, samples, out) == 4
    scoring = load_config(
        None,
        [f"data.path={out}", "data.messages_field=messages", "data.response_field=response"],
    )
    scored, rejects, _ = precompute_examples(scoring.data, "score")
    assert rejects == []
    want = sorted((str(r["prompt"]), r.get("experience") or "") for r in rows)
    got = []
    for ex in scored:
        chat = list(ex.messages)
        prompt = chat[0]["content"] if len(chat) == 1 else chat
        got.append((str(prompt), ex.experience))
    assert sorted(got) == want


def test_train_names_bad_prompt_rows_in_lines(tiny, tmp_path, monkeypatch):
    """python -m train with a bad prompt file stops before the teacher is asked, one line
    per bad row (FILE:LINE: FIELD: reason), or one for a file of no known format."""
    from train.__main__ import cli

    bad = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "a?"}, {"prompt": None}, {"prompt": 1}])
    other = write_jsonl(tmp_path / "o.jsonl", [{"text": "a"}])

    def train(prompts):
        argv = [
            "train", "configs/train/onpolicy.yaml", f"model.path={tiny}",
            f"out_dir={tmp_path / 'run'}", f"onpolicy.prompts={prompts}", "onpolicy.k=8",
            "onpolicy.lmbda=1", "onpolicy.teacher_url=http://127.0.0.1:9",
        ]  # fmt: skip
        monkeypatch.setattr("sys.argv", argv)
        with pytest.raises(SystemExit) as e:
            cli()
        return str(e.value.code).splitlines()

    assert train(bad) == [
        f"[train] {bad}:2: prompt: missing",
        f"[train] {bad}:3: prompt: expected a string, got int",
        "[train] 2 invalid row(s) of 3",
    ]
    (line,) = train(other)
    assert line.startswith(f"[train] {other}: no known format: columns [text]")


# ---- two files of the same conversations (issue 21): the student's and the teacher's ------


def agent_pair(tmp_path, students, teachers):
    from tests.precompute_helpers import write_jsonl as w

    return w(tmp_path / "noexp_agent_train.jsonl", students), w(
        tmp_path / "agent_train.jsonl", teachers
    )


def with_experience(chat, text="Experience: look on the desk first."):
    """The teacher's copy: the experience inside the first user turn."""
    out = [dict(m) for m in chat]
    out[1]["content"] = text + "\n" + out[1]["content"]
    return out


def test_two_files_are_joined_by_id_and_disagreements_rejected(tmp_path):
    from datafiles.pairs import read_pairs
    from tests.precompute_helpers import conversation

    c = {i: conversation(i, 2) for i in range(7)}
    changed = with_experience(c[1])
    changed[4] = {"role": "assistant", "content": "1 + 1 = 3."}
    fewer = with_experience(c[5])[:-2]
    student, teacher = agent_pair(
        tmp_path,
        [{"id": i, "messages": c[i]} for i in (0, 1, 2)]
        + [{"id": 5, "messages": c[5]}, {"id": 6, "messages": c[6], "experience": "E"},
           {"messages": c[3]}],
        [{"id": 0, "messages": with_experience(c[0])}, {"id": 1, "messages": changed},
         {"id": 4, "messages": with_experience(c[4])}, {"id": 5, "messages": fewer},
         {"id": 6, "messages": with_experience(c[6])}],
    )  # fmt: skip
    examples, rejects, total = read_pairs(student, teacher, "train", Fields(), "score")
    assert total == 11 and [ex.id for ex in examples] == ["0"]
    (ex,) = examples
    assert ex.conversation == tuple(c[0]) and ex.teacher_conversation == tuple(
        with_experience(c[0])
    )
    assert ex.teacher_messages == tuple(with_experience(c[0])[:-1]) and ex.experience == ""
    assert [r.message() for r in rejects] == [
        f"{student}:2: messages[4]: turn 4 (assistant turn 1): its content differs from the "
        f"teacher file's turn 4 ({teacher}:2): '1 + 1 = 2.' vs '1 + 1 = 3.'",
        f"{student}:3: id: no row with id '2' in the teacher file {teacher}",
        f"{student}:4: messages[4]: turn 4: 2 assistant turns, the teacher file's row "
        f"({teacher}:4) has 1",
        f"{student}:5: experience: two files (data.teacher_path): the experience belongs in "
        "the teacher's file",
        f"{student}:6: id: missing: the two files are joined by id",
        f"{teacher}:3: id: no row with id '4' in the student file {student}",
    ]
    # The raw rows ride along for the rejects file.
    assert rejects[1].raw == student.read_text().splitlines()[2]


def test_two_files_through_the_config(tmp_path):
    from tests.precompute_helpers import conversation

    student, teacher = agent_pair(
        tmp_path,
        [{"id": "ep1", "messages": conversation(1, 2)}],
        [{"id": "ep1", "messages": with_experience(conversation(1, 2))}],
    )
    c = load_config(None, [f"data.path={student}", f"data.teacher_path={teacher}"])
    (ex,), rejects, _ = precompute_examples(c.data, "score")
    assert rejects == [] and ex.trained == (2, 4)
    assert ex.teacher_conversation[1]["content"].startswith("Experience:")
    # Generate mode: the teacher's prompt is the teacher file's chat before its last turn.
    from transformers import AutoTokenizer

    from precompute.views import make_views

    tok = AutoTokenizer.from_pretrained(tiny_model_dir())
    (ex,), rejects, _ = precompute_examples(c.data, "generate")
    v = make_views(tok, ex, c.view, 0)
    text = tok.apply_chat_template(
        with_experience(conversation(1, 2))[:-1], tokenize=False, add_generation_prompt=True
    )
    assert v.teacher_prompt_ids == tok(text, add_special_tokens=False)["input_ids"]
    assert tok.decode(v.prompt_ids).count("Experience") == 0 and v.conversation is None
