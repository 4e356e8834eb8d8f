"""make bench-crosstok-evidence: cross-tokenizer SKD from the shards against SeqKD (issue #23 §3).

The pair that runs offline: the demo teacher, SmolLM2-135M-Instruct seeing Q+E (the demo's
view, configs/demo/precompute.yaml), and a student of another tokenizer, Gemma 3 270M base
(models/gemma3-270m, built by tools/gemma_model.py: vocabulary 262,144 against 49,152).

1. the Gemma folder (tools.gemma_model) and the demo's questions (precompute.default_data),
2. precompute once on the train questions with `--student models/gemma3-270m`: the
   student's tokenizer differs, so the shards are teacher-vocabulary shards,
3. per seed (training seed; the shards are shared), the Gemma student trains from them:
   - skd:   configs/train/skd.yaml, the cross-tokenizer path (aligned top-k KD on the
            one-to-one tokens, chain-rule span divergence on merged blocks, ULD term);
   - seqkd: configs/train/seqkd.yaml, cross-entropy on the same teacher's responses (the
            same rows; only the student's tokens of the text are used, no alignment),
4. one `python -m tools.eval` on the held-out test questions: the teacher (Q+E), the student
   before, and both methods of every seed, in the student view (Q), greedy,
5. the summary: per seed, SKD minus SeqKD on the same questions (paired bootstrap interval,
   McNemar's p; tools/eval/paired.py), every row's score with its Wilson interval, the
   wall time of every stage, and the pair's alignment over the shards (one-to-one share,
   mapped top-k mass, conversion rate) -> RESULTS (bench/results/crosstok_evidence.json).

Every stage is an ordinary command, printed before it runs (tools/stages.py); WORK/stages.json
records finished stages with their wall time, a re-run skips them, and an interrupted stage
resumes by its own means (precompute's committed files, train resume=true, the evaluation's
generation cache). The stage settings are stored there: a re-run with other sizes is
refused (choose another --work).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import sys
import time
from pathlib import Path

from tools.stages import Runner, Stage

PY = sys.executable
DEMO_PRECOMPUTE = "configs/demo/precompute.yaml"
TEACHER_ROW = "teacher (Q+E)"
BEFORE_ROW = "student before"
METHODS = ("skd", "seqkd")


def row(method: str, seed: int) -> str:
    return f"{method} seed{seed}"


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--seeds", default="0,1", help="comma-separated training seeds")
    ap.add_argument("--teacher", default="models/smollm2-135m-instruct")
    ap.add_argument("--models", default="models", help="where models/gemma3-270m is built")
    ap.add_argument("--data", default="data/default", help="made here if missing")
    ap.add_argument("--train-questions", type=int, default=0, help="0: all of train.jsonl")
    ap.add_argument("--steps", type=int, default=15, help="training steps of each run")
    ap.add_argument("--batch-tokens", type=int, default=4096, help="data.batch_tokens")
    ap.add_argument("--eval-max-tokens", type=int, default=64)
    ap.add_argument("--limit", type=int, default=0, help="evaluate on the first N only (0: all)")
    ap.add_argument("--no-teacher-row", action="store_true", help="skip the teacher's row")
    ap.add_argument("--eval-backend", default="vllm", choices=("vllm", "hf"))
    ap.add_argument("--work", default="runs/crosstok-evidence", help="shards, runs, stages.json")
    ap.add_argument("--report", default="reports/crosstok-evidence")
    ap.add_argument("--results", default="bench/results/crosstok_evidence.json")
    return ap


def student_dir(args) -> Path:
    from tools.gemma_model import FOLDER_NAME

    return Path(args.models) / FOLDER_NAME


def stages(args, seeds: list[int]) -> list[Stage]:
    work = Path(args.work)
    shards = work / "shards"
    student = student_dir(args)
    train = Path(args.data) / "train.jsonl"
    test = Path(args.data) / "test.jsonl"
    precompute = [
        PY, "-m", "precompute", "--config", DEMO_PRECOMPUTE, "--teacher", args.teacher,
        "--student", student, "--data", train, "--out", shards, "--no-progress",
        "sampling.seed=0",
    ]  # fmt: skip
    if args.train_questions:
        precompute += ["--limit", str(args.train_questions)]
    jobs = [
        Stage("model", "Gemma 3 270M: GGUF -> HF folder with a chat template",
              cmd=[PY, "-m", "tools.gemma_model", "--out", args.models],
              done=(student / "build_info.json").exists, outputs=[student / "config.json"]),
        Stage("data", "the demo's questions", cmd=[PY, "-m", "precompute.default_data",
                                                  "--out", args.data],
              done=test.exists, outputs=[test]),
        Stage("precompute", "SmolLM2 teacher (Q+E) -> teacher-vocabulary shards",
              cmd=precompute, inputs=[train, student], outputs=[shards]),
    ]  # fmt: skip
    evaluate = [
        PY, "-m", "tools.eval", "--data", test, "--out", args.report, "--reference", BEFORE_ROW,
        "--max-tokens", str(args.eval_max_tokens), "--backend", args.eval_backend,
        "--model", f"{BEFORE_ROW}={student}",
    ]  # fmt: skip
    if not args.no_teacher_row:
        evaluate += ["--model", f"{TEACHER_ROW}={args.teacher}@qe"]
    for seed in seeds:
        for method in METHODS:
            run = work / f"seed{seed}" / method
            cmd = [
                PY, "-m", "train", f"configs/train/{method}.yaml", f"model.path={student}",
                f"data.shards={shards}", f"data.batch_tokens={args.batch_tokens}",
                f"out_dir={run}", f"seed={seed}", f"max_steps={args.steps}",
                f"save_every={args.steps}", "resume=true",
            ]  # fmt: skip
            jobs.append(Stage(f"seed{seed}/{method}", cmd=cmd, inputs=[shards, student]))
            evaluate += ["--model", f"{row(method, seed)}={run}"]
    if args.limit:
        evaluate += ["--limit", str(args.limit)]
    jobs.append(Stage("eval", "held-out evaluation, all rows", cmd=evaluate))
    return jobs


def alignment_stats(shards: Path, student: Path) -> dict:
    """The real pair's alignment over every row of the folder (issue #23 §3): the share of
    student response tokens that are one-to-one with a teacher token, the share of the
    teacher's top-k mass that maps to student ids (all positions), the load-time conversion
    rate (train/crosstok_rows.py, this process, after the tables are built)."""
    import torch
    from transformers import AutoTokenizer

    from crosstok.vocab import map_topk
    from shards.reader import read_rows
    from train.crosstok_rows import KIND_MAPPED, crosstok_rows

    convert = crosstok_rows(shards, AutoTokenizer.from_pretrained(student))
    rows = list(read_rows(shards))
    t0 = time.perf_counter()
    converted = [convert(r) for r in rows]
    seconds = time.perf_counter() - t0
    kinds = torch.cat([c["ct_kind"] for c in converted])
    topk_mass = mapped_mass = 0.0
    for r in rows:
        m = map_topk(r["topk_ids"], r["topk_logprobs"], r["tail_logprob"], convert.table)
        topk_mass += r["topk_logprobs"].float().exp().sum().item()
        mapped_mass += m.mapped_mass.sum().item()
    teacher_tokens = sum(len(r["response_ids"]) for r in rows)
    return {
        "rows": len(rows),
        "teacher_tokens": teacher_tokens,
        "student_tokens": int(kinds.numel()),
        "student_tokens_one_to_one": float((kinds == KIND_MAPPED).float().mean()),
        "topk_mass_mapped": mapped_mass / topk_mass,
        "teacher_vocab_mapped": convert.mapped_vocab,
        "convert_teacher_tokens_per_s": teacher_tokens / seconds,
        "torch_threads": torch.get_num_threads(),
    }


def summarize(report: Path, seeds: list[int], stage_times: dict, command: str) -> dict:
    """Per seed, SKD minus SeqKD question by question, and every row's score."""
    from tools.eval.paired import paired_difference, scores_by_id

    doc = json.loads((report / "results.json").read_text())
    models = {m["name"]: m for m in doc["models"]}
    (task,) = {t for m in doc["models"] for t in m["tasks"]}
    scores = {
        name: {
            "mean": m["tasks"][task]["mean"],
            "ci95": m["tasks"][task]["ci95"],
            "n": m["tasks"][task]["n"],
            "mean_response_tokens": m["mean_response_tokens"],
        }
        for name, m in models.items()
    }
    by_id = {name: scores_by_id(m, task) for name, m in models.items()}
    skd_vs_seqkd = {
        f"seed{s}": paired_difference(by_id[row("skd", s)], by_id[row("seqkd", s)]) for s in seeds
    }
    return {
        "command": command,
        "task": task,
        "scores": scores,
        "skd_minus_seqkd": skd_vs_seqkd,
        "vs_student_before": {n: d[task] for n, d in doc.get("paired", {}).items()},
        "eval_settings": doc.get("settings", {}),
        "stage_seconds": {name: v["seconds"] for name, v in stage_times.items()},
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
    }


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    settings = {k: v for k, v in vars(args).items() if k not in ("results", "report")}
    runner = Runner(work / "stages.json", settings=settings)
    t0 = time.time()
    runner.run(stages(args, seeds))
    command = shlex.join(["python", "-m", "bench.crosstok_evidence", *(argv or sys.argv[1:])])
    out = summarize(Path(args.report), seeds, runner.done, command)
    out["alignment"] = alignment_stats(work / "shards", student_dir(args))
    Path(args.results).parent.mkdir(parents=True, exist_ok=True)
    Path(args.results).write_text(json.dumps(out, indent=2) + "\n")
    for s, d in out["skd_minus_seqkd"].items():
        lo, hi = d["ci95"]
        print(f"{s}: SKD - SeqKD = {d['diff']:+.3f} [{lo:+.3f}, {hi:+.3f}], "
              f"McNemar p {d.get('mcnemar_p', float('nan')):.3g}")  # fmt: skip
    print(f"done in {time.time() - t0:.0f} s; results: {args.results}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
