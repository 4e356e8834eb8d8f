"""python -m tools.eval agent: models as agents, on the test fold of a text game.

    python -m tools.eval agent --env-config FILE|key=value ... [--out reports/agent]
        [--model NAME=PATH[@experience=FILE] ...]
        [--teacher PATH] [--teacher-experience FILE] [--student PATH] [--runs runs]
        [--reference NAME] [--batch-size 32] [--max-tokens 32] [--temperature 0] [--seed 0]
        [--dtype D] [--tensor-parallel-size N] [--enforce-eager | --no-enforce-eager]

Every model plays the configured episodes (default: every seed of the test fold) in its own
process (tools/eval/agent_play.py): one vLLM engine per model with prefix caching, the
chat policy of envs/ (THE prompt format, the model's chat template, THE action rule), and
the batch runner, which sends the prompts of up to --batch-size episodes to the engine as
one batch per step. Greedy unless --temperature is set.

--env-config: YAML files (an envs.config.EnvConfig mapping, or a config with an `env:`
section, whose `teacher` key then names the default teacher) and key=value overrides, in
order, e.g. `--env-config game=twc --env-config params.numLocations=1 num_seeds=300`.

The experience (envs.experience: a train-fold file) goes into a model's view only when its
spec says so: `NAME=PATH@experience=FILE`, or --teacher-experience for the standard rows.
Without --model, the standard rows: the teacher with the experience (when given) and
without, the student before (the model the runs under --runs started from, or --student),
and every run's latest checkpoint, as in `python -m tools.eval`.

Per model: success rate (95% Wilson interval), mean score (95% bootstrap interval), mean
steps, invalid-action and mapped rates; against --reference (default "student before", else
the first row), on the same episodes: McNemar's test on success and the paired bootstrap
on score (tools/eval/agent_stats.py). Episodes are cached in OUT/episodes (or --cache),
keyed by the model's weights and tokenizer, the environment config, the experience and the
sampling settings, so a rerun plays only new or unfinished models; a killed model resumes
from its last finished episode.

Writes OUT/agent_results.json, OUT/models/NAME.json (every episode's record, to re-read),
OUT/agent_report.md and OUT/agent_success.png (tools/eval/agent_report.py).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import shlex
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import yaml

from envs.config import EnvConfig
from envs.experience import load_experience
from runtime.lifetime import spawn_guarded
from runtime.typed_config import apply_overrides, build
from shards.fingerprint import weights_fingerprint
from tools.eval.agent_report import write_agent_report
from tools.eval.agent_stats import N_BOOT, paired_episodes, summarize
from tools.eval.generate import add_engine_options, engine_options
from tools.eval.run import merged_lora, resolve_path, standard_models
from vllm_engine.env import default_kvcache_space

# Bump when what an episode is changes for the same settings (prompt format, action rule,
# results layout), so that older cached episodes are not reused.
FORMAT_VERSION = 1
REFERENCE = "student before"
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
    "vocab.json", "merges.txt",
)  # fmt: skip


@dataclass(frozen=True)
class AgentSpec:
    name: str
    path: str  # what the user gave: model, checkpoint or run folder
    experience: str | None = None  # experience file (the model plays in the teacher view)
    model_dir: str = ""  # the model folder it resolves to


def parse_agent_model(spec: str) -> AgentSpec:
    """NAME=PATH[@experience=FILE]."""
    if "=" not in spec:
        raise ValueError(f"--model {spec!r}: expected NAME=PATH[@experience=FILE]")
    name, rest = spec.split("=", 1)
    path, experience = rest, None
    if "@" in rest:
        path, _, option = rest.partition("@")
        if not option.startswith("experience="):
            raise ValueError(f"--model {spec!r}: expected NAME=PATH[@experience=FILE]")
        experience = option.removeprefix("experience=")
    if not name.strip() or not path:
        raise ValueError(f"--model {spec!r}: expected NAME=PATH[@experience=FILE]")
    return AgentSpec(name.strip(), path, experience)


def standard_agent_models(
    teacher: str, experience: str | None, student: str | None, runs: str
) -> list[AgentSpec]:
    """tools.eval's standard rows as agents: the Q+E view is the teacher with the experience
    (left out without one), Q the plain view."""
    out = []
    for m in standard_models(teacher, student, runs):
        if m.view == "qe":
            if experience:
                out.append(AgentSpec("teacher + experience", m.path, experience))
            continue
        out.append(AgentSpec(m.name.removesuffix(" (Q)"), m.path))
    return out


def load_env_config(items: list[str]) -> tuple[EnvConfig, dict]:
    """(EnvConfig, the YAML files' other top-level keys) from files and key=value overrides,
    in order; one line naming the file or key for anything wrong."""
    data: dict = {}
    rest: dict = {}
    for item in items:
        if Path(item).is_file():
            try:
                doc = yaml.safe_load(Path(item).read_text(encoding="utf-8")) or {}
            except (OSError, yaml.YAMLError) as e:
                said = " ".join(str(e).split())
                raise SystemExit(f"error: --env-config {item}: {said}") from None
            if not isinstance(doc, dict):
                raise SystemExit(f"error: --env-config {item}: expected a mapping")
            if isinstance(doc.get("env"), dict):  # a config with an env: section
                rest.update({k: v for k, v in doc.items() if k != "env"})
                doc = doc["env"]
            data.update(doc)
        elif "=" in item:
            try:
                data = apply_overrides(data, [item])
            except ValueError as e:
                raise SystemExit(f"error: --env-config: {e}") from None
        else:
            raise SystemExit(f"error: --env-config {item}: no such file, and not key=value")
    try:
        return build(EnvConfig, data, "env."), rest
    except ValueError as e:
        raise SystemExit(f"error: --env-config: {e}") from None


def file_digest(folder: str, names: tuple[str, ...]) -> str:
    h = hashlib.sha256()
    for name in names:
        p = Path(folder) / name
        if p.is_file():
            h.update(name.encode() + b"\0" + p.read_bytes())
    return h.hexdigest()


def cache_key(spec: AgentSpec, env: EnvConfig, args) -> tuple[str, dict]:
    """(key, what it is made of): the weights and the tokenizer (chat template included),
    the environment config, the experience's content, and the sampling settings. Batch size
    and engine start-up are not in it: they change how fast, not what is played."""
    experience = None
    if spec.experience:
        e = load_experience(spec.experience)
        experience = {"text": e.text, "source": e.source}
    settings = {
        "format": FORMAT_VERSION,
        "weights": weights_fingerprint(spec.model_dir),
        "tokenizer": file_digest(spec.model_dir, TOKENIZER_FILES),
        "env": dataclasses.asdict(env),
        "experience": experience,
        "max_tokens": args.max_tokens,
        "temperature": args.temperature,
        "seed": args.seed,
        "samples": args.samples,
        # Given engine options only: a run on the device's defaults keeps its cache key.
        **{k: v for k, v in engine_options(args).items() if v is not None},
    }
    blob = json.dumps(settings, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16], settings


def make_job(spec: AgentSpec, env: EnvConfig, args, cache: Path, key: str) -> dict:
    engine = {
        **engine_options(args),
        "max_model_len": args.max_model_len,
        "seed": args.seed,
        "enable_prefix_caching": args.prefix_caching,
        # The engine's metrics (prefix-cache hits) are read at the end.
        "disable_log_stats": False,
    }
    return {
        "model_dir": spec.model_dir,
        "env": dataclasses.asdict(env),
        "experience": spec.experience,
        "samples": args.samples,
        "max_tokens": args.max_tokens,
        "temperature": args.temperature,
        "seed": args.seed,
        "batch_size": args.batch_size,
        "engine": engine,
        "out": str(cache / f"{key}.json"),
        "partial": str(cache / f"{key}.partial.jsonl"),
    }


def play_in_child(spec: AgentSpec, job: dict) -> dict:
    """The default player: tools.eval.agent_play in its own process (its engine dies with it)."""
    job_file = Path(job["out"]).with_suffix(".job.json")
    job_file.write_text(json.dumps(job, indent=1))
    cmd = [sys.executable, "-m", "tools.eval.agent_play", "--job", str(job_file)]
    print(f"[eval agent] {spec.name}: playing\n$ {shlex.join(cmd)}", flush=True)
    proc = spawn_guarded(cmd)
    if proc.wait() != 0:
        raise subprocess.CalledProcessError(proc.returncode, cmd)
    job_file.unlink()
    return json.loads(Path(job["out"]).read_text())


Player = Callable[[AgentSpec, dict], dict]


def agent_specs(args, extra: dict) -> list[AgentSpec]:
    """--model specs, else the standard rows (the teacher from --teacher or the config's)."""
    if args.model:
        return [parse_agent_model(m) for m in args.model]
    teacher = args.teacher or extra.get("teacher")
    if not teacher:
        raise ValueError("give --model NAME=PATH, or --teacher PATH for the standard rows")
    return standard_agent_models(teacher, args.teacher_experience, args.student, args.runs)


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python -m tools.eval agent",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument(
        "--env-config", action="append", default=[], nargs="+",
        help="YAML file (EnvConfig, or a config with an env: section) or key=value; repeat",
    )  # fmt: skip
    ap.add_argument("--out", default="reports/agent", help="report folder")
    ap.add_argument("--model", action="append", default=[], help="NAME=PATH[@experience=FILE]")
    ap.add_argument("--teacher", help="standard rows: the teacher (default: the config's)")
    ap.add_argument("--teacher-experience", help="standard rows: the teacher's experience file")
    ap.add_argument("--student", help="standard rows: the student before (default: the runs')")
    ap.add_argument("--runs", default="runs", help="standard rows: runs to add")
    ap.add_argument("--reference", help=f"row compared with the others (default {REFERENCE!r})")
    ap.add_argument("--batch-size", type=int, default=32, help="episodes per engine batch")
    ap.add_argument("--max-tokens", type=int, default=32, help="per reply")
    ap.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    ap.add_argument("--seed", type=int, default=0, help="sampling and bootstrap seed")
    ap.add_argument("--samples", type=int, default=1, help="episodes per seed")
    ap.add_argument("--max-model-len", type=int, default=8192, help="vllm: context window")
    ap.add_argument("--n-boot", type=int, default=N_BOOT, help="bootstrap resamples")
    ap.add_argument(
        "--prefix-caching", action=argparse.BooleanOptionalAction, default=True,
        help="vllm: reuse the KV cache of an episode's history (not in the cache key)",
    )  # fmt: skip
    add_engine_options(ap)
    ap.add_argument("--cache", default="", help="episodes cache (default OUT/episodes)")
    return ap


def main(argv=None, player: Player | None = None) -> int:
    """player: (spec, job) -> results (tests pass one that plays a fake game in-process)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser().parse_args(argv)
    if args.batch_size < 1 or args.samples < 1:
        raise SystemExit("error: --batch-size and --samples must be >= 1")
    env, extra = load_env_config([x for group in args.env_config for x in group])
    default_kvcache_space()
    try:  # bad specs and experience files: one line each, before anything is played
        specs = agent_specs(args, extra)
        for s in specs:
            if s.experience:
                load_experience(s.experience)
        dirs = [resolve_path(s.path)[0] for s in specs]
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(f"error: {e}") from None
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        raise SystemExit(f"error: --model: repeated names in {names}")
    reference = args.reference or (REFERENCE if REFERENCE in names else names[0])
    if reference not in names:
        raise SystemExit(f"error: --reference {reference!r} is none of the rows {names}")
    if env.fold != "test":
        print(f"[eval agent] note: playing the {env.fold} fold, not test", flush=True)
    out = Path(args.out)
    cache = Path(args.cache) if args.cache else out / "episodes"
    cache.mkdir(parents=True, exist_ok=True)
    player = player or play_in_child
    models = []
    for spec, model_dir in zip(specs, dirs, strict=True):
        if (Path(model_dir) / "adapter_config.json").exists():
            model_dir = merged_lora(model_dir, cache)
        spec = dataclasses.replace(spec, model_dir=model_dir)
        key, settings = cache_key(spec, env, args)
        done = cache / f"{key}.json"
        if done.exists():
            print(f"[eval agent] {spec.name}: cached episodes ({done})", flush=True)
            doc = json.loads(done.read_text())
        else:
            doc = player(spec, make_job(spec, env, args, cache, key))
        records = [e["episode"] for e in doc["episodes"]]
        summary = summarize(records, args.n_boot, args.seed)
        models.append(
            {
                "name": spec.name, "path": spec.path, "model_dir": spec.model_dir,
                "experience": spec.experience,
                "experience_source": settings["experience"]["source"]
                if settings["experience"] else None,
                "cache_key": key, "summary": summary, "timing": doc["timing"],
                "rejected": doc["rejected"], "episodes": doc["episodes"],
            }
        )  # fmt: skip
        print(
            f"[eval agent] {spec.name}: success {summary['success_rate']:.3f} "
            f"[{summary['success_ci95'][0]:.3f}, {summary['success_ci95'][1]:.3f}], "
            f"score {summary['mean_score']:.3f}, {summary['episodes']} episodes",
            flush=True,
        )
    ref = next(m for m in models if m["name"] == reference)
    by_id = {m["name"]: {e["id"]: e["episode"] for e in m["episodes"]} for m in models}
    paired = {
        m["name"]: paired_episodes(by_id[m["name"]], by_id[reference], args.n_boot, args.seed)
        for m in models
        if m is not ref
    }
    settings = {
        "env": dataclasses.asdict(env),
        "batch_size": args.batch_size,
        "max_tokens": args.max_tokens,
        "temperature": args.temperature,
        "seed": args.seed,
        "samples": args.samples,
        "n_boot": args.n_boot,
        "command": shlex.join(["python", "-m", "tools.eval", "agent", *argv]),
    }
    report = write_agent_report(out, models, settings, reference, paired)
    print(f"[eval agent] report: {report}", flush=True)
    return 0
