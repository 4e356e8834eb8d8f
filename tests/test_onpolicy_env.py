"""On-policy distillation with episodes in an environment: episode rounds
(tools/onpolicy/rounds.py --env-config, tools/onpolicy/episodes.py).

The round is run stage by stage in this process, each from the argv the round's plan gives
it: the tiny model plays a deterministic pure-Python game (its own sampler, transformers),
the episodes become the two views' files, precompute scores them (the shards stage's own
command line, resolved and run with the transformers backend) and the train stage trains
two steps on the result. The teacher's top-k is checked against the tiny model's own
log-softmax on the teacher view, built here from the episode.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from datafiles.conversation import encode
from datafiles.views import render
from envs.base import Observation
from envs.config import EnvConfig, env_record
from envs.experience import Experience, save_experience
from envs.prompt import episode_messages
from envs.runner import EnvPool
from precompute.__main__ import resolve
from precompute.hf_backend import HFBackend
from precompute.run import run
from shards.codec import Codebook
from shards.reader import ShardFolder, read_rows
from shards.spans import trained_index
from tests.fixtures.tiny_model import tiny_model_dir
from tests.train_helpers import TINY_RUN, ShardStub
from tools.onpolicy import rounds
from tools.onpolicy.episodes import hf_sampler, play_to_file, read_episodes, unusable
from train.__main__ import main as train_main

K = 8
CODEBOOK = Codebook.for_k(K)
EXPERIENCE = "Keys are under the mat; the door opens once you hold the key."
ACTIONS = ("look around", "open door", "take key")


class DoorGame:
    """Deterministic: "take key" then "open door" wins; any other action is answered."""

    def __init__(self, config: EnvConfig):
        self.config = config

    def seeds(self):
        return self.config.select_seeds([1, 2, 3, 4])

    def reset(self, seed, fold):
        self.seed, self.n, self.key = seed, 0, False
        return self._obs(f"Room {seed}: a shut door and a mat.", 0.0, False)

    def step(self, action):
        self.n += 1
        won = action == "open door" and self.key
        if action == "take key":
            self.key, text = True, "You take the key."
        elif won:
            text = "The door opens."
        else:
            text = f"You {action}." if action in ACTIONS else "Unknown action."
        return self._obs(text, float(won), won or self.n >= self.config.step_limit)

    def close(self):
        pass

    def _obs(self, text, reward, done):
        won = reward > 0
        return Observation("Leave the room.", text, ACTIONS, reward, reward, done, won, self.n)


@pytest.fixture(scope="module")
def tiny():
    return tiny_model_dir()


def test_an_episode_round_scores_whole_episodes_in_the_teacher_view(tiny, tmp_path):
    env_yaml = tmp_path / "env.yaml"
    env_yaml.write_text("game: twc\nfold: train\nseeds: [1, 2]\nstep_limit: 2\n")
    exp = tmp_path / "exp.json"
    save_experience(Experience(EXPERIENCE, {"builder": "test", "fold": "train"}), exp)
    work = tmp_path / "work"
    args = rounds.parser().parse_args(
        ["--rounds", "1", "--teacher", str(tiny), "--student", str(tiny),
         "--env-config", str(env_yaml), "--experience", str(exp), "--work", str(work),
         "--backend", "hf", "--n", "2", "--max-tokens", "4", "--k", str(K), "--steps", "2",
         "--train-args", " ".join(TINY_RUN)]
    )  # fmt: skip
    stages = rounds.round_stages(args, work, 1)
    assert [s.name for s in stages] == [
        f"round-001/{step}" for step in ("episodes", "views", "shards", "train")
    ]
    play_argv = stages[0].argv()
    assert play_argv[2:4] == ["tools.onpolicy.episodes", "--model"] and play_argv[4] == str(tiny)
    opt = dict(zip(play_argv[5::2], play_argv[6::2], strict=False))
    episodes_file = work / "round-001" / "episodes.jsonl"
    assert opt["--out"] == str(episodes_file) and opt["--seed"] == "1" and opt["--samples"] == "2"

    # 1. The student plays (the episodes command's own function, on the pure-Python game).
    config = rounds.load_env_config(env_yaml)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny)
    complete = hf_sampler(str(tiny), max_tokens=4, temperature=1.0)

    def play_once():
        return play_to_file(
            config, lambda m: render(tok, m), complete, episodes_file, seed=1, samples=2,
            pool=EnvPool(config, DoorGame), log=lambda line: None,
        )  # fmt: skip

    result = play_once()
    assert len(result.episodes) == 4 and not result.rejected
    whole = episodes_file.read_bytes()
    # Killed while writing the last episode: its line is torn; a re-run cuts it and plays
    # that episode alone again, with the same replies (seeded by its identity and step).
    lines = whole.splitlines(keepends=True)
    episodes_file.write_bytes(b"".join(lines[:-1]) + lines[-1][: len(lines[-1]) // 2])
    again = play_once()
    assert len(again.episodes) == 1 and episodes_file.read_bytes() == whole
    assert len(play_once().episodes) == 0
    episodes = {ep.id: ep for ep in read_episodes(episodes_file)}
    assert sorted(episodes) == sorted(f"twc[]/train/{s}/{j}" for s in (1, 2) for j in (0, 1))

    # 2. The two views, 3. the teacher scores them: the shards stage's command as given.
    stages[1].fn()
    shards_argv = stages[2].argv()
    assert shards_argv[1:3] == ["-m", "precompute"]
    _, cfg = resolve(shards_argv[3:])
    run(cfg, HFBackend(str(tiny), K, batch_size=8), log=lambda m: None)
    usable = {i: ep for i, ep in episodes.items() if unusable(ep) is None}
    assert usable  # the tiny model's replies: some mapped, some invalid, none empty here
    rows = {r["id"]: r for r in read_rows(work / "round-001" / "shards")}
    assert sorted(rows) == sorted(usable)
    # The game and the experience under a teacher rollout's keys (precompute/rollout.py).
    extra = ShardFolder(work / "round-001" / "shards").metadata.extra
    assert extra["env"] == env_record(config)
    assert extra["env"] == {"game": "twc", "params": "", "fold": "train", "step_limit": 2}
    assert extra["experience"] == {"builder": "test", "fold": "train"}
    assert extra["tags"]["round"] == 1 and not {"env", "experience"} & set(extra["tags"])

    from transformers import AutoModelForCausalLM

    lm = AutoModelForCausalLM.from_pretrained(tiny, dtype=torch.float32).eval()
    eos = tok.convert_tokens_to_ids("<|im_end|>")
    for ep_id, row in rows.items():
        ep = usable[ep_id]
        assert row["source"] == "student" and row["sample_index"] == ep.sample
        assert json.loads(row["meta"])["episode"] == json.loads(json.dumps(ep.record()))
        prompt, resp = row["prompt_ids"].tolist(), row["response_ids"].tolist()
        teacher_prompt = row["teacher_prompt_ids"].tolist()
        # The student view is the episode without the experience, the teacher's with it
        # (the rows stop at the last span's end of turn, before the template's newline).
        n = len(prompt + resp)
        assert prompt + resp == encode(tok, episode_messages(ep), None, False)[:n]
        teacher_ids = encode(tok, episode_messages(ep, EXPERIENCE), None, False)
        assert teacher_prompt + resp == teacher_ids[: len(teacher_prompt + resp)]
        assert resp[-1] == tok.convert_tokens_to_ids("<|im_end|>")
        assert EXPERIENCE not in tok.decode(prompt + resp)
        assert EXPERIENCE in tok.decode(teacher_prompt)
        # One span per action: the action the game got, then the end of the turn.
        spans = list(zip(row["span_starts"].tolist(), row["span_lengths"].tolist(), strict=True))
        assert len(spans) == ep.steps
        conv = prompt + resp
        for (s, n), action in zip(spans, ep.actions, strict=True):
            assert conv[s + n - 1] == eos
            assert tok.decode(conv[s : s + n - 1]) == action
        # The teacher's top-k at every span token: the model's log-softmax on the teacher
        # view (float64 reference), not on the student's.
        at = trained_index(row).numpy()
        shift = len(teacher_prompt) - len(prompt)
        with torch.no_grad():
            ref_t = torch.log_softmax(lm(torch.tensor([teacher_ids])).logits[0].double(), -1)
            ref_s = torch.log_softmax(lm(torch.tensor([conv])).logits[0].double(), -1)
        ids, lps = row["topk_ids"].numpy(), row["topk_logprobs"].numpy()
        assert ids.shape == (len(at), K)
        err_t = err_s = 0.0
        for j, t in enumerate(at):
            want = ref_t[t + shift - 1][ids[j]].numpy()
            top = torch.topk(ref_t[t + shift - 1], K).indices.numpy()
            assert set(ids[j].tolist()) == set(top.tolist())
            # Stored logprobs are quantized (shards/codec.py): within half a step.
            half = 0.5 * np.minimum(CODEBOOK.step_max, CODEBOOK.step_top * np.exp(-want / 2))
            assert np.all(np.abs(lps[j] - want) <= half + 1e-4), (lps[j], want)
            err_t += float(np.abs(lps[j] - want).sum())
            err_s += float(np.abs(lps[j] - ref_s[t - 1][ids[j]].numpy()).sum())
        assert err_t < err_s  # scored on the teacher's view, not the student's

    # 4. Training continues on the round's folder.
    train_argv = stages[3].argv()
    assert f"data.shards={work / 'round-001' / 'shards'}" in train_argv
    train_main(train_argv[3:])
    metrics = [json.loads(line) for line in open(work / "round-001" / "train" / "metrics.jsonl")]
    assert [m["step"] for m in metrics if "loss" in m] == [1, 2]
    assert all(math.isfinite(m["loss"]) for m in metrics if "loss" in m)


def test_episode_rounds_refuse_other_folds_and_mixed_inputs(tmp_path):
    env_yaml = tmp_path / "env.yaml"
    env_yaml.write_text("game: twc\nfold: test\nnum_seeds: 2\n")
    base = ["--rounds", "0", "--teacher", "T", "--student", "S", "--work", str(tmp_path / "w")]
    with pytest.raises(SystemExit, match=r"env.yaml: fold test: rounds train on their episodes"):
        rounds.main([*base, "--env-config", str(env_yaml)])
    with pytest.raises(SystemExit, match="either --data .* or --env-config"):
        rounds.main([*base, "--env-config", str(env_yaml), "--data", "q.jsonl"])
    env_yaml.write_text("game: twc\nfold: train\nsteps: 3\n")
    with pytest.raises(SystemExit, match=r"env.yaml: unknown config key\(s\) steps"):
        rounds.main([*base, "--env-config", str(env_yaml)])


# ---- live: the batch of an on-policy micro-batch's episodes ----------------------------------


class FakeTeacher:
    """A teacher server's client in this process: the tiny model's top-k on the response
    tokens given the prompt (teacher forcing), every request recorded."""

    max_model_len = 2048
    num_retries = 0

    def __init__(self, lm):
        self.lm, self.requests = lm, []

    def submit(self, prompt_ids, response_ids):
        from concurrent.futures import Future

        from vllm_engine.teacher_client import TeacherScore

        self.requests.append((list(prompt_ids), list(response_ids)))
        seq = torch.tensor([list(prompt_ids) + list(response_ids)])
        with torch.no_grad():
            lp = torch.log_softmax(self.lm(seq).logits[0].float(), -1)
        at = torch.arange(len(prompt_ids) - 1, seq.shape[1] - 1)  # predicts each response token
        top = torch.topk(lp[at], K)
        done = Future()
        done.set_result(
            TeacherScore(
                top.indices.numpy(),
                top.values.numpy(),
                lp[at, torch.tensor(response_ids)].numpy(),
            )
        )
        return done


def reference_spans(tok, messages):
    """(start, length) of each assistant turn in the whole rendering, found independently:
    its start is where the turns before it with the generation prompt end, its length the
    action's tokens and the end of turn."""
    out = []
    for i, m in enumerate(messages):
        if m["role"] == "assistant":
            start = len(encode(tok, messages[:i], None, True))
            out.append((start, len(tok(m["content"], add_special_tokens=False)["input_ids"]) + 1))
    return out


def test_live_episodes_train_every_action_span_with_the_teachers_top_k(tiny):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from train.onpolicy_env import LiveEpisodes, episode_keys

    tok = AutoTokenizer.from_pretrained(tiny)
    lm = AutoModelForCausalLM.from_pretrained(tiny, dtype=torch.float32).eval()
    config = EnvConfig(game="twc", fold="train", seeds=(1, 2, 3, 4), step_limit=3)
    replies = ("take the key", "open door", "dance a jig")

    def complete(prompts, seeds):  # a scripted student: the reply follows its seed
        return [replies[s % 3] for s in seeds]

    teacher = FakeTeacher(lm)
    live = LiveEpisodes(
        config, tok, complete, teacher, experience=EXPERIENCE, per_batch=3, grad_accum=2,
        max_length=4096, pool=EnvPool(config, DoorGame), log=lambda line: None,
    )  # fmt: skip
    # Micro-batch 3 (step 1, index 1): positions 9..11 of the seeds repeated: pass 2.
    keys = episode_keys([1, 2, 3, 4], 3, 3)
    assert [(k.seed, k.sample) for k in keys] == [(2, 2), (3, 2), (4, 2)]
    keys = {k for b in range(8) for k in episode_keys([1, 2, 3, 4], b, 3)}
    assert len(keys) == 24  # no (seed, sample) twice
    episodes = live.play(1, 1)
    assert [(e.seed, e.sample) for e in episodes] == [(2, 2), (3, 2), (4, 2)]
    batch = live.batch(1, 1)  # the same episodes again (seeded by identity and step)
    assert batch.ids == [e.id for e in episodes] and len(teacher.requests) == 3
    m = live.pop_metrics()
    assert m["env_episodes"] == 6 and m["env_s"] > 0 and m["teacher_wait_s"] >= 0

    # The reference: each episode's two views rendered here, spans found by prefix renderings.
    width = batch.input_ids.shape[1]
    want_pos, want_tgt, want_ids, want_lps = [], [], [], []
    for b, (ep, (prompt, response)) in enumerate(zip(episodes, teacher.requests, strict=True)):
        student = episode_messages(ep)
        teacher_msgs = episode_messages(ep, EXPERIENCE)
        s_ids, t_ids = encode(tok, student, None, False), encode(tok, teacher_msgs, None, False)
        s_spans, t_spans = reference_spans(tok, student), reference_spans(tok, teacher_msgs)
        assert len(s_spans) == ep.steps
        # One request: the teacher view up to its first action, then through the last one.
        t_end = sum(t_spans[-1])
        assert prompt == t_ids[: t_spans[0][0]] and response == t_ids[t_spans[0][0] : t_end]
        assert EXPERIENCE in tok.decode(prompt) and EXPERIENCE not in tok.decode(s_ids)
        # The trained row: the student view, every action span.
        assert batch.input_ids[b, : sum(s_spans[-1])].tolist() == s_ids[: sum(s_spans[-1])]
        with torch.no_grad():
            ref = torch.log_softmax(lm(torch.tensor([t_ids])).logits[0].double(), -1)
        for (s, n), (t, n_t) in zip(s_spans, t_spans, strict=True):
            assert n == n_t and s_ids[s : s + n] == t_ids[t : t + n]
            assert tok.decode(s_ids[s : s + n - 1]) in ep.actions
            for j in range(n):
                want_pos.append(b * width + s + j - 1)
                want_tgt.append(s_ids[s + j])
                top = torch.topk(ref[t + j - 1], K)
                want_ids.append(top.indices.tolist())
                want_lps.append(top.values.tolist())
    assert batch.positions.tolist() == want_pos and batch.targets.tolist() == want_tgt
    for got_ids, got_lps, ids, lps in zip(
        batch.topk_ids.tolist(), batch.topk_logprobs.tolist(), want_ids, want_lps, strict=True
    ):
        assert got_ids == ids  # the client's order (rank order), kept
        np.testing.assert_allclose(got_lps, lps, atol=1e-5)
    assert any(a == "open door" for e in episodes for a in e.actions)  # mapped and won


def test_lmbda_mixes_live_episodes_with_shard_batches(tiny, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from train.batches import collate
    from train.config import OnPolicyConfig
    from train.onpolicy import OnPolicyBatches, is_onpolicy
    from train.onpolicy_env import LiveEpisodes

    tok = AutoTokenizer.from_pretrained(tiny)
    lm = AutoModelForCausalLM.from_pretrained(tiny, dtype=torch.float32).eval()
    shard = []
    for i in range(6):
        row = {
            "id": f"shard{i}",
            "prompt_ids": torch.tensor([5, 6, 7]),
            "response_ids": torch.tensor([8, 9]),
            "topk_ids": torch.zeros(2, K, dtype=torch.long),
            "topk_logprobs": torch.full((2, K), -3.0),
            "tail_logprob": torch.full((2,), -0.5),
            "token_logprob": torch.full((2,), -1.0),
        }
        batch = collate([row], 64, 0)
        batch.cursor = i
        shard.append(batch)
    cfg = OnPolicyConfig(teacher_url="http://fake", lmbda=0.5, max_new_tokens=4, episodes=2)
    teacher = FakeTeacher(lm)
    source = OnPolicyBatches(
        ShardStub(shard), teacher, cfg, student=lambda: lm, tokenizer=tok, seed=3,
        grad_accum=2, max_length=4096,
    )  # fmt: skip
    config = EnvConfig(game="twc", fold="train", seeds=(1, 2, 3), step_limit=1)
    source.episodes = LiveEpisodes(
        config, tok, source.complete, teacher, experience=EXPERIENCE, per_batch=2,
        grad_accum=2, max_length=4096, pool=EnvPool(config, DoorGame), log=lambda line: None,
    )  # fmt: skip
    got = [batch for _, batch in zip(range(6), source, strict=False)]
    live = [is_onpolicy(3, b // 2, b % 2, 0.5) for b in range(6)]
    assert 0 < sum(live) < 6  # both kinds in these six draws
    for b, (batch, on) in enumerate(zip(got, live, strict=True)):
        assert batch.cursor == b  # the shard position advances either way (resume)
        if on:  # the student's episodes (the tiny model's own replies), one row each
            assert [i.split("/")[:2] for i in batch.ids] == [["twc[]", "train"]] * 2
        else:
            assert batch.ids == [f"shard{b}"]
    assert len(teacher.requests) == 2 * sum(live)  # one request per episode
    m = source.pop_metrics()
    assert m["onpolicy"] == sum(live) and m["env_episodes"] == 2 * sum(live)
    assert m["env_s"] > 0 and m["env_play_s"] > 0 and "teacher_wait_s" in m


def test_row_meta_and_sample_fields_are_checked_per_row(tmp_path):
    from datafiles.formats import Fields, read_examples

    chat = [{"role": "user", "content": "go"}, {"role": "assistant", "content": "look"}]
    rows = [
        {"id": "a", "messages": chat, "meta": {"episode": {"seed": 1}}, "sample": 2},
        {"id": "b", "messages": chat, "meta": "not an object"},
        {"id": "c", "messages": chat, "meta": {"index": 3}},
        {"id": "d", "messages": chat, "sample": -1},
    ]
    path = tmp_path / "s.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    fields = Fields(meta="meta", sample_index="sample")
    examples, rejects, total = read_examples(path, "train", fields, "score")
    assert total == 4 and [(e.id, e.meta, e.sample_index) for e in examples] == [
        ("a", {"episode": {"seed": 1}}, 2)
    ]
    assert [r.message().removeprefix(f"{tmp_path}/") for r in rejects] == [
        "s.jsonl:2: meta: expected a JSON object, got str",
        "s.jsonl:3: meta: key(s) index are precompute's own row meta",
        "s.jsonl:4: sample: expected an integer >= 0, got -1",
    ]
