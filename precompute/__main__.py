"""python -m precompute: run the teacher once over a data set and write shards.

The CLI is a thin overlay on the config: neutral defaults for any teacher (name it and the
data: `--teacher DIR --data FILE`), or a YAML (`--config configs/demo/precompute.yaml`, the
CPU demo's). A few common options have flags, and any config key can be set as `key=value`
or `--key=value` (dotted keys reach into sections, e.g. sampling.n=4, view.thinking=mixed,
engine.tensor_parallel_size=2), anywhere among the arguments. Unknown keys are errors.
Response length and context default to the model's own (generation_config.json, config.json);
a student's tokenizer is checked only when one is named.

Expected failures (bad input rows, a config that cannot work, shard folder conflicts, an
output folder that cannot be written) end with one line per problem,
`precompute: error: FILE:LINE: FIELD: MESSAGE` (the parts that apply), and exit status 2; a
traceback means a bug.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys

import yaml

# None of these loads torch or vLLM: a spawned worker re-imports this module before it sets
# its devices, and main() sets vLLM's environment before the engine imports vLLM.
from precompute.config import help_lines, load_config
from precompute.errors import WorkerFailed, error_lines, expected_errors
from precompute.jobs import run_job
from precompute.launch import slurm_overrides
from vllm_engine.env import default_kvcache_space

# flag -> config key
FLAGS = {
    "teacher": "teacher",
    "student": "student",
    "data": "data.path",
    "out": "out",
    "mode": "mode",
    "backend": "backend",
    "k": "k",
    "n": "sampling.n",
    "limit": "data.limit",
    "num_workers": "num_workers",
    "worker_index": "worker_index",
}


def config_file(argv: list[str]) -> str:
    """The config file `--config` names in argv, else '' (the neutral built-in defaults)."""
    for i, arg in enumerate(argv):
        if arg == "--config" and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith("--config="):
            return arg.split("=", 1)[1]
    return ""


def parser(config: str = "") -> argparse.ArgumentParser:
    """The CLI; its help lists every config key with the value in effect under `config`."""
    try:
        effective = load_config(config, [], check=False) if config else None
        heading = (
            f"the values in effect with {config} (marked where it changes the built-in default)"
            if config
            else "the built-in defaults (no config file)"
        )
    except (OSError, ValueError) as e:  # --help still works; running reports the error
        effective, heading = None, f"the built-in defaults ({config} does not load: {e})"
    p = argparse.ArgumentParser(
        prog="python -m precompute",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=f"config keys (key=value or --key=value), {heading}:\n"
        + "\n".join(help_lines(effective=effective, source=config))
        + "\n  engine.<any vllm.EngineArgs field>=VALUE\n      e.g. --engine.dtype=bfloat16 "
        "--engine.max_model_len=4096 --engine.tensor_parallel_size=2",
    )
    p.add_argument(
        "--config",
        default=None,
        help="YAML config (default: none, the neutral defaults below; the demo's: "
        "configs/demo/precompute.yaml)",
    )
    p.add_argument("--teacher", help="teacher model folder (teacher=)")
    p.add_argument("--student", help="student folder whose tokenizer must match (student=)")
    p.add_argument("--data", help="input file or saved datasets folder (data.path=)")
    p.add_argument("--out", help="shard folder (out=)")
    p.add_argument("--mode", choices=["generate", "score", "rollout"], help="(mode=)")
    p.add_argument("--backend", choices=["vllm", "hf"], help="(backend=)")
    p.add_argument("--k", type=int, help="top-k logprobs per token (k=)")
    p.add_argument("--n", type=int, help="samples per example, generate mode (sampling.n=)")
    p.add_argument("--limit", type=int, help="first N valid examples only (data.limit=)")
    p.add_argument(
        "--num-workers", type=int, help="workers splitting the data, 0: auto (num_workers=)"
    )
    p.add_argument(
        "--worker-index", type=int, help="run only this worker of the split (worker_index=)"
    )
    p.add_argument(
        "--ray",
        action="store_true",
        help="run the workers as Ray tasks on the cluster at RAY_ADDRESS, else a local one",
    )
    p.add_argument(
        "--skip-invalid",
        action="store_true",
        help="write invalid input rows to OUT/rejects-w<I>-<n>.jsonl and go on (default: stop)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.add_argument("overrides", nargs="*", help="key=value config overrides")
    return p


def split_overrides(extra: list[str]) -> list[str]:
    """`--a.b=c`, `--a.b c` and `a.b=c` (anything argparse did not take) to `a.b=c`.

    argparse gives its positional `overrides` only the first run of key=value words; the
    ones after a later flag (`--out X a=1 --data F b=2`) arrive here."""
    out, i = [], 0
    while i < len(extra):
        arg = extra[i]
        if not arg.startswith("--"):
            if "=" not in arg or arg.startswith("="):
                raise ValueError(f"unexpected argument {arg!r} (config overrides are key=value)")
            out.append(arg)
            i += 1
            continue
        key = arg[2:]
        if "=" in key:
            out.append(key)
        elif i + 1 < len(extra) and not extra[i + 1].startswith("--"):
            out.append(f"{key}={extra[i + 1]}")
            i += 1
        else:
            raise ValueError(f"{arg} needs a value (--key=value)")
        i += 1
    return [o.replace("-", "_", o.index("=")) if "-" in o.split("=", 1)[0] else o for o in out]


def resolve(argv: list[str] | None = None):
    argv = sys.argv[1:] if argv is None else list(argv)
    args, extra = parser(config_file(argv)).parse_known_args(argv)
    # A SLURM array task is one worker of the split; explicit settings (later) win.
    overrides = slurm_overrides(os.environ) + list(args.overrides) + split_overrides(extra)
    for flag, key in FLAGS.items():
        value = getattr(args, flag)
        if value is not None:
            overrides.append(f"{key}={value}")
    if args.skip_invalid:
        overrides.append("skip_invalid=true")
    if args.ray:
        overrides.append("ray=true")
    if args.no_progress:
        overrides.append("progress=false")
    return args, load_config(args.config or None, overrides)


def main(argv: list[str] | None = None) -> int:
    # Before anything imports vLLM, which reads it at import.
    default_kvcache_space()
    # vLLM's INFO lines would bury the progress bar and the summary.
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    try:
        args, cfg = resolve(argv)
    except ValueError as e:  # a bad override or config file, an invalid value
        return fail(e)
    if args.print_config:
        print(yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False), end="")
        return 0
    try:
        run_job(cfg)
    except (*expected_errors(), WorkerFailed) as e:
        return fail(e, cfg.out)
    return 0


def fail(e: BaseException, out: str | None = None) -> int:
    for line in error_lines(e, out):
        print(f"precompute: error: {line}", file=sys.stderr)
    return 2


if __name__ == "__main__":  # vLLM spawns processes that re-import __main__
    raise SystemExit(main())
