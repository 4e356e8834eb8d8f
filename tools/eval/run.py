"""python -m tools.eval: did distillation work? Models x views on held-out questions.

    python -m tools.eval [--data data/default/test.jsonl] [--out reports/demo]
        [--runs runs] [--model NAME=PATH[@q|@qe] ...] [--backend vllm|hf] [--reference NAME]
        [--dtype D] [--tensor-parallel-size N] [--enforce-eager | --no-enforce-eager]

Each model generates (greedy by default) for every held-out example, in the student view
(`@q`, the question alone) or the teacher view (`@qe`, question + experience, rendered
exactly as precompute renders it: same config, same chat template). Responses are scored
with the task's own checker (tools/eval/scorers.py): exact match of the final number for math,
pass@1 in a sandboxed subprocess for HumanEval-style code (tools/eval/code_runner.py), keyword
match for free text. The scorer is chosen per row: `test` + `entry_point` fields mean code,
a `keywords` field means keywords, otherwise the `answer` field is a number to match.

Without --model, the standard comparison: the teacher with Q+E, the teacher with Q, the
student before distillation with Q (the model the runs started from), and every run under
--runs (its latest checkpoint) with Q. PATH may be a model folder, a checkpoint folder or a
run folder; LoRA adapters are merged into their base model first. Generations are cached
under OUT/generations (or --cache DIR), keyed by the model's weights, the prompts and the
sampling settings, so adding a run to the report
(`make train METHOD=jsd` then `make eval`) only generates for the new run.

Every row is also compared with a reference row (--reference NAME, default the student
before) on the same questions: the paired difference with its 95% paired bootstrap interval
and McNemar's p-value (tools/eval/paired.py).

Writes OUT/results.json, OUT/model_comparison.csv, OUT/comparison_report.md and the PNG
plots (tools/eval/report.py).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from precompute.config import load_config
from precompute.inputs import InputError, raw_rows, read_examples
from precompute.views import make_views
from runtime.lifetime import spawn_guarded
from shards.fingerprint import weights_fingerprint
from tools.eval import scorers
from tools.eval.code_runner import check_humaneval
from tools.eval.generate import add_engine_options, engine_flags, engine_options
from tools.eval.report import BASELINE, write_report
from tools.eval.scorers import bootstrap_interval, wilson_interval
from tools.eval.trackers import log_results
from train import checkpoint as ckpt
from train.logger import tracker_names
from train.model import quantization_config
from vllm_engine.env import default_kvcache_space

DEFAULT_CONFIG = "configs/demo/precompute.yaml"
VIEWS = {"q": "Q", "qe": "Q+E"}


@dataclass(frozen=True)
class ModelSpec:
    name: str
    path: str  # what the user gave: model, checkpoint or run folder
    view: str  # q | qe
    model_dir: str = ""  # the model folder it resolves to
    run_dir: str = ""  # the training run, when it came from one (for training curves)


def resolve_path(path: str) -> tuple[str, str]:
    """(model folder, run folder or "") for a model, checkpoint or run folder."""
    p = Path(path)
    model = ckpt.latest_model_dir(p)
    if model is not None:  # a run folder: its newest complete checkpoint
        return str(model), str(p)
    if ckpt.is_checkpoint(p):
        run = ckpt.checkpoint_run(p)
        has_curves = run is not None and (run / "metrics.jsonl").exists()
        return str(ckpt.checkpoint_model_dir(p)), str(run) if has_curves else ""
    if not p.exists():
        raise FileNotFoundError(f"{path}: no such model, checkpoint or run folder")
    return str(p), ""


def parse_model(spec: str) -> ModelSpec:
    """NAME=PATH[@q|@qe]; the view defaults to the student's (q)."""
    if "=" not in spec:
        raise ValueError(f"--model {spec!r}: expected NAME=PATH[@q|@qe]")
    name, rest = spec.split("=", 1)
    path, _, view = rest.rpartition("@") if "@" in rest else (rest, "", "q")
    if view not in VIEWS:
        raise ValueError(f"--model {spec!r}: view must be q or qe, got {view!r}")
    return ModelSpec(name.strip(), path, view)


def run_dirs(runs: str) -> list[Path]:
    root = Path(runs)
    if not root.is_dir():
        return []
    return [r for r in sorted(root.iterdir()) if ckpt.is_run(r)]


def run_student(run: Path) -> str:
    """The model a run started from (its resolved config, saved with every checkpoint)."""
    return ckpt.checkpoint_config(ckpt.latest_checkpoint(run))["model"]["path"]


def standard_models(teacher: str, student: str | None, runs: str) -> list[ModelSpec]:
    """Teacher with and without the experience, each student before (the model the runs
    started from, unless given), and each run."""
    found = run_dirs(runs)
    befores = [student] if student else list(dict.fromkeys(run_student(r) for r in found))
    # A run that started from another run's checkpoint (on-policy after SKD) already has
    # its "before" among the rows: that run.
    inside = [r.resolve() for r in found]
    befores = [b for b in befores if not any(Path(b).resolve().is_relative_to(r) for r in inside)]
    models = [ModelSpec("teacher (Q+E)", teacher, "qe"), ModelSpec("teacher (Q)", teacher, "q")]
    for i, path in enumerate(befores):
        name = "student before (Q)" if i == 0 else f"student before: {Path(path).name} (Q)"
        models.append(ModelSpec(name, path, "q"))
    models += [ModelSpec(f"{run.name} (Q)", str(run), "q") for run in found]
    return models


def adapter_quantization(adapter_dir: str) -> str:
    """model.quantize of the run that trained an adapter, from its checkpoint's config
    ("none" for an adapter folder outside a checkpoint)."""
    checkpoint = Path(adapter_dir).parent
    if not (checkpoint / "config.yaml").exists():
        return "none"
    return ckpt.checkpoint_config(checkpoint).get("model", {}).get("quantize", "none")


def merged_lora(adapter_dir: str, cache: Path) -> str:
    """A LoRA checkpoint merged into its base model (vLLM then loads it like any model).

    A QLoRA adapter (model.quantize) was trained on the quantized base: it is merged into
    that base quantized as training quantized it, then dequantized, so that the merged model
    computes what the trained one did (merging into the full-precision base would not).
    """
    cfg = json.loads((Path(adapter_dir) / "adapter_config.json").read_text())
    quantize = adapter_quantization(adapter_dir)
    digest = hashlib.sha256((Path(adapter_dir) / "adapter_model.safetensors").read_bytes())
    if quantize != "none":
        digest.update(quantize.encode())
    out = cache / f"merged-{digest.hexdigest()[:16]}"
    if not (out / "config.json").exists():
        # peft and transformers' model classes take seconds to import: only a LoRA merge needs
        # them here (generation runs in tools.eval.generate's own process)
        from peft import PeftModel
        from transformers import AutoModelForCausalLM, AutoTokenizer

        kwargs = {}
        if quantize != "none":
            device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
            kwargs["quantization_config"] = quantization_config(quantize, "float32", device)
            kwargs["device_map"] = {"": device}
        base = AutoModelForCausalLM.from_pretrained(
            cfg["base_model_name_or_path"], dtype=torch.float32, **kwargs
        )
        if quantize != "none":
            base = base.dequantize().to(dtype=torch.float32, device="cpu")
        merged = PeftModel.from_pretrained(base, adapter_dir).merge_and_unload()
        merged.save_pretrained(out)
        AutoTokenizer.from_pretrained(adapter_dir).save_pretrained(out)
    return str(out)


def load_examples(config: str, data: str | None, limit: int):
    """(precompute config, examples, raw rows by index): the held-out rows, validated."""
    overrides = [f"data.path={data}"] if data else []
    cfg = load_config(config if Path(config).exists() else None, overrides)
    examples, rejects, total = read_examples(cfg.data, mode="generate")
    if rejects:
        raise InputError(rejects, total)
    if limit:
        examples = examples[:limit]
    raws = dict(enumerate(row for _, row, _ in raw_rows(Path(cfg.data.path), cfg.data.split)))
    return cfg, examples, raws


def build_prompts(model_dir: str, examples, cfg, view: str) -> list[dict]:
    from transformers import AutoTokenizer  # seconds to import: see merged_lora

    tok = AutoTokenizer.from_pretrained(model_dir)
    rows = []
    for ex in examples:
        v = make_views(tok, ex, cfg.view, cfg.sampling.seed)
        rows.append(
            {"id": ex.id, "prompt_ids": v.teacher_prompt_ids if view == "qe" else v.prompt_ids}
        )
    return rows


def generations(spec: ModelSpec, prompts: list[dict], args, cache: Path) -> dict:
    """The model's responses to the prompts: cached, else generated in a child process."""
    settings = {
        "weights": weights_fingerprint(spec.model_dir),
        "prompts": hashlib.sha256(json.dumps(prompts).encode()).hexdigest(),
        "backend": args.backend,
        "max_tokens": args.max_tokens,
        "temperature": args.temperature,
        "seed": args.seed,
        # Given engine options only: a run on the device's defaults keeps its cache key.
        **{k: v for k, v in engine_options(args).items() if v is not None},
    }
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]
    out = cache / f"{key}.json"
    if out.exists():
        print(f"[eval] {spec.name}: cached generations ({out})", flush=True)
        return json.loads(out.read_text())
    prompt_file = cache / f"{key}.prompts.json"
    prompt_file.write_text(json.dumps(prompts))
    cmd = [
        sys.executable, "-m", "tools.eval.generate", "--model", spec.model_dir,
        "--prompts", str(prompt_file), "--out", str(out), "--backend", args.backend,
        "--max-tokens", str(args.max_tokens), "--temperature", str(args.temperature),
        "--seed", str(args.seed), *engine_flags(args),
    ]  # fmt: skip
    print(f"[eval] {spec.name}: {len(prompts)} prompts\n$ {shlex.join(cmd)}", flush=True)
    proc = spawn_guarded(cmd)  # dies with this process (kill -9 too), its engine with it
    if proc.wait() != 0:
        raise subprocess.CalledProcessError(proc.returncode, cmd)
    prompt_file.unlink()
    return json.loads(out.read_text())


def scorer_for(row: dict) -> str:
    if "test" in row and "entry_point" in row:
        return "pass@1"
    if "keywords" in row:
        return "keyword_match"
    return "exact_match"


def score(row: dict, answer: str | None, response: str, timeout_s: float) -> tuple[str, float]:
    """(metric name, score in [0, 1]) of one response, by the row's own checker."""
    kind = scorer_for(row)
    if kind == "pass@1":
        code = scorers.extract_code(response, row["prompt"])
        # check_humaneval prepends the prompt: pass the completion alone.
        completion = code[len(row["prompt"]) :] if code.startswith(row["prompt"]) else code
        return kind, float(check_humaneval(row, completion, timeout_s=timeout_s).passed)
    if kind == "keyword_match":
        return kind, float(scorers.keyword_match(response, row["keywords"]))
    if answer is None:
        raise ValueError(f"example {row.get('id')!r}: no reference answer to score against")
    return kind, float(scorers.math_exact_match(response, answer))


def evaluate_model(spec: ModelSpec, cfg, examples, raws, args, cache: Path) -> dict:
    prompts = build_prompts(spec.model_dir, examples, cfg, spec.view)
    gen = generations(spec, prompts, args, cache)
    per_task: dict[str, dict] = {}
    records = []
    for ex, out in zip(examples, gen["rows"], strict=True):
        row = raws[ex.index]
        metric, value = score(row, ex.answer, out["text"], args.code_timeout)
        task = str(row.get("task") or metric)
        t = per_task.setdefault(task, {"metric": metric, "scores": []})
        t["scores"].append(value)
        records.append(
            {"id": ex.id, "task": task, "score": value, "tokens": len(out["token_ids"]),
             "response": out["text"]}
        )  # fmt: skip
    tasks = {}
    for task, t in per_task.items():
        s = t["scores"]
        binary = all(v in (0.0, 1.0) for v in s)
        lo, hi = wilson_interval(int(sum(s)), len(s)) if binary else bootstrap_interval(s)
        tasks[task] = {
            "metric": t["metric"],
            "n": len(s),
            "mean": sum(s) / len(s),
            "ci95": [lo, hi],
            "ci_method": "wilson" if binary else "bootstrap",
        }
    n_tokens = sum(r["tokens"] for r in records)
    return {
        "name": spec.name,
        "path": spec.path,
        "model_dir": spec.model_dir,
        "run_dir": spec.run_dir,
        "view": VIEWS[spec.view],
        "tasks": tasks,
        "mean_response_tokens": n_tokens / max(len(records), 1),
        "tokens_per_s": gen["tokens"] / max(gen["seconds"], 1e-9),
        "backend": gen["backend"],
        "examples": records,
    }


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python -m tools.eval",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--config", default=DEFAULT_CONFIG, help="precompute config: views, fields")
    ap.add_argument("--data", default="data/default/test.jsonl", help="held-out examples")
    ap.add_argument("--out", default="reports/demo", help="report folder")
    ap.add_argument("--model", action="append", default=[], help="NAME=PATH[@q|@qe], repeat")
    ap.add_argument("--runs", default="runs", help="standard comparison: runs to add")
    ap.add_argument("--teacher", help="standard comparison: teacher (default: config's)")
    ap.add_argument("--student", help="standard comparison: student before (the runs')")
    ap.add_argument("--backend", default="vllm", choices=("vllm", "hf"))
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    ap.add_argument("--seed", type=int, default=0)
    add_engine_options(ap)
    ap.add_argument("--limit", type=int, default=0, help="first N examples only (0: all)")
    ap.add_argument("--code-timeout", type=float, default=5.0, help="seconds per program")
    ap.add_argument(
        "--reference",
        default=BASELINE,
        help=f"row the others are compared with, question by question (default: {BASELINE!r})",
    )
    ap.add_argument("--log-with", default="", help="trackers, e.g. wandb,mlflow (accelerate)")
    ap.add_argument(
        "--cache",
        default="",
        help="generations cache folder (default OUT/generations); reports may share one",
    )
    return ap


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    tracker_names(args.log_with, "--log-with")  # refused before any model runs
    default_kvcache_space()
    cfg, examples, raws = load_examples(args.config, args.data, args.limit)
    out = Path(args.out)
    cache = Path(args.cache) if args.cache else out / "generations"
    cache.mkdir(parents=True, exist_ok=True)
    if args.model:
        specs = [parse_model(m) for m in args.model]
    else:
        specs = standard_models(args.teacher or cfg.teacher, args.student, args.runs)
    names = [spec.name for spec in specs]
    if args.reference != BASELINE and args.reference not in names:
        raise SystemExit(f"error: --reference {args.reference!r} is none of the rows {names}")
    results = []
    for spec in specs:
        model_dir, run_dir = resolve_path(spec.path)
        if (Path(model_dir) / "adapter_config.json").exists():
            model_dir = merged_lora(model_dir, cache)
        spec = ModelSpec(spec.name, spec.path, spec.view, model_dir, run_dir)
        results.append(evaluate_model(spec, cfg, examples, raws, args, cache))
        best = ", ".join(f"{t} {v['mean']:.3f}" for t, v in results[-1]["tasks"].items())
        print(f"[eval] {spec.name}: {best}", flush=True)
    settings = {
        "data": str(Path(cfg.data.path)),
        "examples": len(examples),
        "backend": args.backend,
        "max_tokens": args.max_tokens,
        "temperature": args.temperature,
        "seed": args.seed,
        "command": shlex.join(["python", "-m", "tools.eval", *(argv or sys.argv[1:])]),
    }
    report = write_report(out, results, settings, reference=args.reference)
    log_results(args.log_with, out, results, settings)
    print(f"[eval] report: {report}", flush=True)
    return 0


if __name__ == "__main__":  # vLLM spawns processes that re-import __main__
    raise SystemExit(main())
