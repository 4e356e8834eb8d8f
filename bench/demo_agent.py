"""make demo-agent: does distillation teach the student to act in a text game? Measured.

The game (TextWorldExpress, envs/), its parameters and step limit, the experience builder
and the student's sampling while it plays come from configs/demo/agent.yaml; the teacher
rollouts' sampling, top-k and engine from configs/demo/agent-rollout.yaml (its `env:` is
replaced by agent.yaml's). Nothing here names a game: edit those files to change it.

Stages (tools/stages.py; each an ordinary command, printed before it runs):

- experience:   `python -m envs.experience` reads the teacher's experience off train-fold
                gold episodes (agent.yaml's builder and train seeds).
- dev:          `python -m tools.eval agent` on --dev-episodes dev-fold episodes: the teacher
                with the experience against the student before (McNemar on success, paired
                bootstrap on score). The demo only means something when the teacher is ahead.
Per seed (teacher sampling, training, student sampling):
- rollouts:     the teacher plays --train-episodes train-fold seeds (precompute mode rollout,
                experience in its view), keep=all: the data of every training stage.
- skd, seqkd:   offline training on that folder (configs/train/skd.yaml, seqkd.yaml); SeqKD
                with data.keep=success, so on the episodes the teacher solved only (the
                usual agent SFT), from the same teacher run. SeqKD is skipped, and says so,
                when the teacher solved none.
- onpolicy:     live on-policy in the environment (configs/train/onpolicy.yaml, lmbda 1,
                onpolicy.env_config): the student plays train-fold episodes with its vLLM
                engine, and a teacher server (vLLM, started for this stage, stopped after)
                scores each whole episode in its view, with the experience.
- rounds:       `python -m tools.onpolicy.rounds --env-config`: the student plays, the
                teacher scores, the student trains; --rounds times.
- eval:         `python -m tools.eval agent` on --test-episodes test-fold episodes: every
                model against the student before; the episodes cache is shared by the seeds,
                so the seed-independent rows (teacher, student before) play once.

REPORT/summary.md gathers the seeds: the dev-fold gap, every model's success and score
against the student before, the on-policy variants against SKD (paired on the same
episodes, from the evaluation's episode records), and every stage's wall time.

Resume: WORK/stages.json records the finished stages with their wall time; a re-run skips
them, and an interrupted stage resumes with its own resume (precompute, train resume=true,
rounds, the evaluation's cache). A re-run with other sizes is refused (settings).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import yaml

from bench.demo_agent_rows import BEFORE_ROW, METHODS, REFERENCE, TEACHER_ROW
from bench.demo_onpolicy import run_path, teacher_service
from envs.config import EnvConfig
from runtime.typed_config import build, option
from tools.stages import Runner, Stage, later, later_args, write_durably
from vllm_engine.env import KVCACHE_SPACE_VAR

PY = sys.executable
DEMO_CONFIG = "configs/demo/agent.yaml"
ROLLOUT_CONFIG = "configs/demo/agent-rollout.yaml"
MIN_TEST_EPISODES = 300  # issue 22: the demo's verdicts stand on at least this many
# --small: a quick end-to-end check of every stage (minutes), not a measurement.
SMALL = {
    "train_episodes": 8, "dev_episodes": 8, "test_episodes": 8, "steps": 2,
    "episodes": 2, "rounds": 1, "round_steps": 2,
}  # fmt: skip
# The default: one seed in about 66 minutes on a 2-core CPU, measured (docs/agents.md);
# a GPU takes larger sizes as options.
FULL = {
    "train_episodes": 100, "dev_episodes": 100, "test_episodes": MIN_TEST_EPISODES,
    "steps": 15, "episodes": 4, "rounds": 1, "round_steps": 10,
}  # fmt: skip


@dataclass(frozen=True)
class ExperienceSpec:
    builder: str = option("categories", "envs.experience builder (rules, categories, ...)")
    train_seeds: str = option("0-299", "train-fold seeds it is read off: A-B or a,b,c")


@dataclass(frozen=True)
class PlaySpec:
    max_tokens: int = option(24, "the length limit of one reply, every model and phase")
    temperature: float = option(1.0, "the student's sampling while it plays (on-policy, rounds)")

    def __post_init__(self):
        if self.max_tokens < 1 or self.temperature < 0:
            raise ValueError("play: max_tokens must be >= 1 and temperature >= 0")


@dataclass(frozen=True)
class EngineSpec:
    dtype: str = option(
        "",
        "the dtype of the demo's vLLM engines (teacher rollouts and server, rounds, "
        "evaluations; the trainer's student sampler follows the trainer); empty: the device's",
    )
    batch: int = option(32, "episodes played at once: teacher rollouts and evaluations")
    cpu_kv_cache_gib: float = option(
        0.0,
        "vLLM's CPU KV cache (VLLM_CPU_KVCACHE_SPACE) of the rollouts' and evaluations' "
        "engines, unless the variable is set; 0: their default (1 GiB)",
    )

    def batch_env(self) -> dict[str, str] | None:
        """The environment of the stages that play `batch` episodes at once. Only theirs:
        live on-policy runs a trainer, its student engine and a teacher server side by side,
        and a larger cache for each ran this machine out of memory."""
        if not self.cpu_kv_cache_gib or os.environ.get(KVCACHE_SPACE_VAR):
            return None
        return {KVCACHE_SPACE_VAR: f"{self.cpu_kv_cache_gib:g}"}

    def __post_init__(self):
        if self.batch < 1 or self.cpu_kv_cache_gib < 0:
            raise ValueError("engine: batch must be >= 1 and cpu_kv_cache_gib >= 0")


@dataclass(frozen=True)
class AgentDemoConfig:
    """configs/demo/agent.yaml: the game and the experience (the seeds are the demo's)."""

    env: EnvConfig = field(default_factory=EnvConfig)
    experience: ExperienceSpec = field(default_factory=ExperienceSpec)
    play: PlaySpec = field(default_factory=PlaySpec)
    engine: EngineSpec = field(default_factory=EngineSpec)


def load_demo_config(path: str | Path) -> AgentDemoConfig:
    """The demo's config; one line naming the file for anything wrong."""
    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
        if not isinstance(data, dict):
            raise ValueError("expected a mapping (env, experience, play)")
        return build(AgentDemoConfig, data)
    except (OSError, yaml.YAMLError, ValueError) as e:
        raise SystemExit(f"{path}: {' '.join(str(e).split())}") from None


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python -m bench.demo_agent",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--seeds", default="0", help="comma-separated training seeds (e.g. 0,1)")
    ap.add_argument(
        "--methods", default=",".join(METHODS),
        help=f"the methods trained and evaluated for these seeds (default all: "
        f"{','.join(METHODS)}); seeds of one folder may differ in them",
    )  # fmt: skip
    ap.add_argument("--small", action="store_true", help=f"a quick end-to-end check: {SMALL}")
    ap.add_argument("--config", default=DEMO_CONFIG, help="the game, experience and sampling")
    ap.add_argument("--rollout-config", default=ROLLOUT_CONFIG, help="teacher rollouts")
    ap.add_argument("--teacher", default="models/smollm2-135m-instruct")
    ap.add_argument("--student", default="models/smollm2-135m-instruct")
    for name, help in (
        ("train-episodes", "train-fold seeds the teacher plays (rollouts) and the student"),
        ("dev-episodes", "dev-fold episodes of the teacher-vs-student-before check"),
        ("test-episodes", f"test-fold episodes of the evaluation (>= {MIN_TEST_EPISODES})"),
        ("steps", "training steps of SKD, SeqKD and live on-policy"),
        ("episodes", "live on-policy: episodes the student plays per step"),
        ("rounds", "on-policy rounds"),
        ("round-steps", "training steps per round"),
    ):
        key = name.replace("-", "_")
        ap.add_argument(f"--{name}", type=int, help=f"{help} (default {FULL[key]}, "
                        f"--small {SMALL[key]})")  # fmt: skip
    ap.add_argument("--work", help="rollouts, runs, stages.json (default runs/demo-agent[-small])")
    ap.add_argument("--report", help="reports (default reports/demo-agent[-small])")
    return ap


def parse_args(argv=None) -> argparse.Namespace:
    """The options with their sizes resolved (--small's or the full ones); bad values are
    one line (argparse's error)."""
    ap = parser()
    args = ap.parse_args(argv)
    sizes = SMALL if args.small else FULL
    for key, default in sizes.items():
        if getattr(args, key) is None:
            setattr(args, key, default)
        if getattr(args, key) < 1:
            ap.error(f"--{key.replace('_', '-')} must be >= 1, got {getattr(args, key)}")
    try:
        seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    except ValueError:
        ap.error(f"--seeds {args.seeds!r}: expected comma-separated integers, e.g. 0,1")
    if not seeds or len(set(seeds)) != len(seeds) or min(seeds) < 0:
        ap.error(f"--seeds {args.seeds!r}: expected distinct integers >= 0, e.g. 0,1")
    args.seed_list = seeds
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = sorted(set(methods) - set(METHODS))
    if unknown or not methods:
        ap.error(f"--methods {args.methods!r}: expected some of {','.join(METHODS)}")
    args.method_list = [m for m in METHODS if m in methods]
    suffix = "-small" if args.small else ""
    args.work = args.work or f"runs/demo-agent{suffix}"
    args.report = args.report or f"reports/demo-agent{suffix}"
    return args


def settings(args) -> dict:
    """What decides what the stages produce: a re-run with others is refused."""
    keys = ("config", "rollout_config", "teacher", "student", *FULL)
    return {k: getattr(args, k) for k in keys}


# ---- the game's files -------------------------------------------------------------------


def env_for(cfg: AgentDemoConfig, fold: str, n: int) -> EnvConfig:
    """The config's game on the first n seeds of a fold."""
    return replace(cfg.env, fold=fold, seeds=(), seed_offset=0, num_seeds=n)


def env_file(args, fold: str) -> Path:
    return Path(args.work) / f"env-{fold}.yaml"


def write_env_files(args, cfg: AgentDemoConfig) -> None:
    """WORK/env-{train,dev,test}.yaml: the game on each fold's first seeds, the files that
    rounds, live on-policy and the evaluations read (EnvConfig mappings)."""
    sizes = {"train": args.train_episodes, "dev": args.dev_episodes, "test": args.test_episodes}
    for fold, n in sizes.items():
        d = asdict(env_for(cfg, fold, n))
        d.pop("seeds")
        text = yaml.safe_dump(d, sort_keys=False)
        path = env_file(args, fold)
        if not path.exists() or path.read_text() != text:
            write_durably(path, text)


def env_overrides(env: EnvConfig) -> list[str]:
    """precompute's env.* overrides for this game (the rollout config's env replaced)."""
    return [
        f"env.game={env.game}", f"env.params={json.dumps(env.params)}", f"env.fold={env.fold}",
        f"env.num_seeds={env.num_seeds}", f"env.step_limit={env.step_limit}",
    ]  # fmt: skip


def experience_path(args) -> Path:
    return Path(args.work) / "experience.json"


# ---- stages -----------------------------------------------------------------------------


def experience_stage(args, cfg: AgentDemoConfig) -> Stage:
    out = experience_path(args)
    return Stage(
        "experience", "the teacher's experience, from train-fold gold episodes",
        cmd=[PY, "-m", "envs.experience", "--game", cfg.env.game,
             "--params", cfg.env.game_params(), "--builder", cfg.experience.builder,
             "--train-seeds", cfg.experience.train_seeds, "--out", out],
        outputs=[out],
    )  # fmt: skip


def eval_command(args, cfg: AgentDemoConfig, fold: str, out: Path, models: list) -> list:
    """tools.eval agent on the fold's episodes, greedy, against the student before; the
    episodes cache is shared by every evaluation of the demo (a model plays a fold once)."""
    return [
        PY, "-m", "tools.eval", "agent", "--env-config", env_file(args, fold),
        "--out", out, "--cache", Path(args.report) / "episodes",
        "--max-tokens", str(cfg.play.max_tokens), "--reference", REFERENCE,
        "--batch-size", str(cfg.engine.batch),
        *(["--dtype", cfg.engine.dtype] if cfg.engine.dtype else []),
        "--model", f"{TEACHER_ROW}={args.teacher}@experience={experience_path(args)}",
        "--model", f"{BEFORE_ROW}={args.student}", *models,
    ]  # fmt: skip


def dev_stage(args, cfg: AgentDemoConfig) -> Stage:
    out = Path(args.report) / "dev"
    return Stage(
        "dev", "the teacher with experience against the student before, dev fold",
        cmd=eval_command(args, cfg, "dev", out, []), env=cfg.engine.batch_env(),
        inputs=[experience_path(args)], outputs=[out / "agent_results.json"],
    )  # fmt: skip


def solved(folder: Path) -> tuple[int, int]:
    """(episodes solved, episodes listed) of a rollout folder (its episodes files)."""
    from precompute.rollout import listed_episodes

    listed = listed_episodes(folder).values()
    return sum(1 for e in listed if e.get("success")), len(listed)


def seqkd_skip(folder: Path):
    def why() -> str | None:
        won, n = solved(folder)
        return None if won else f"the teacher solved none of its {n} train episodes ({folder})"

    return why


def skipped(stages_done: dict, seed: int, method: str) -> bool:
    """The method's stage was skipped (SeqKD without data): the evaluation leaves it out."""
    return stages_done.get(f"seed{seed}/{method}", {}).get("command", "").startswith("(skipped")


def seed_methods(stages_done: dict, seed: int, methods: list[str]) -> list[str]:
    """The methods a seed's evaluation plays: those of this run and those an earlier run
    trained in the folder (a seed run again with other --methods keeps them in its report),
    less any whose stage was skipped."""
    return [
        m
        for m in METHODS
        if (m in methods or f"seed{seed}/{m}" in stages_done) and not skipped(stages_done, seed, m)
    ]


def forget_stale_evals(runner: Runner, seeds: list[int], methods: list[str]) -> list[str]:
    """Drop the record of each seed evaluation that left out a method the seed trains now
    (a seed run again with more --methods), so that it runs again: the models it had
    played come from the episode cache. Returns what was dropped, said in a line each."""
    said = []
    for seed in seeds:
        name = f"seed{seed}/eval"
        command = runner.done.get(name, {}).get("command")
        if command is None:
            continue
        missing = [
            m for m in seed_methods(runner.done, seed, methods) if f"--model={m}=" not in command
        ]
        if missing:
            runner.forget(name)
            said.append(f"{name}: evaluated again, for {', '.join(missing)}")
    return said


def seed_stages(args, cfg: AgentDemoConfig, seed: int, runner: Runner) -> list[Stage]:
    """The seed's stages in order, named seed<S>/<stage>."""
    work = Path(args.work) / f"seed{seed}"
    exp = experience_path(args)
    train_env = env_for(cfg, "train", args.train_episodes)
    shards_all = work / "rollouts"
    rollout_cfg = yaml.safe_load(Path(args.rollout_config).read_text()) or {}
    engine = rollout_cfg.get("engine") or {}
    if cfg.engine.dtype:
        engine = {**engine, "dtype": cfg.engine.dtype}
    # The teacher server of the seed's live stage takes the rollouts' context length.
    teacher = teacher_service(
        args, seed, int(engine.get("max_model_len", 4096)), dtype=cfg.engine.dtype or None
    )
    common = [f"seed={seed}", f"max_steps={args.steps}", f"save_every={args.steps}",
              "resume=true", "data.max_length=4096"]  # fmt: skip

    def rollout(out: Path) -> list:
        return [
            PY, "-m", "precompute", "--config", args.rollout_config, "--teacher", args.teacher,
            "--out", out, "--no-progress", *env_overrides(train_env), "rollout.keep=all",
            f"rollout.experience={exp}", f"rollout.max_tokens={cfg.play.max_tokens}",
            f"rollout.batch_size={cfg.engine.batch}",
            f"sampling.seed={seed}", *(f"engine.{k}={v}" for k, v in engine.items()),
        ]  # fmt: skip

    def trainer(method: str, config: str, shards: Path, *extra) -> list:
        return [
            PY, "-m", "train", f"configs/train/{config}.yaml", f"model.path={args.student}",
            f"data.shards={shards}", f"out_dir={work / method}", *common, *extra,
        ]  # fmt: skip

    live = [
        later(lambda: f"onpolicy.teacher_url={teacher().url}"), "onpolicy.lmbda=1",
        "onpolicy.sampler=vllm", f"onpolicy.env_config={env_file(args, 'train')}",
        f"onpolicy.experience={exp}", f"onpolicy.episodes={args.episodes}",
        f"onpolicy.max_new_tokens={cfg.play.max_tokens}",
        f"onpolicy.temperature={cfg.play.temperature}",
    ]  # fmt: skip
    rounds = [
        PY, "-m", "tools.onpolicy.rounds", "--rounds", str(args.rounds),
        "--env-config", env_file(args, "train"), "--experience", exp,
        "--teacher", args.teacher, "--student", args.student, "--work", work / "rounds",
        "--train-config", "configs/train/jsd.yaml", "--steps", str(args.round_steps),
        "--max-tokens", str(cfg.play.max_tokens), "--temperature", str(cfg.play.temperature),
        "--seed", str(seed), "--k", str(rollout_cfg.get("k", 64)),
        "--precompute-args", " ".join(f"engine.{k}={v}" for k, v in engine.items()),
        "--episodes-args", " ".join(f"--engine {k}={v}" for k, v in engine.items()),
        "--train-args", "data.max_length=4096",
    ]  # fmt: skip

    def trained_models() -> list[str]:
        return [
            f"--model={m}={run_path(args, seed, m)}"
            for m in seed_methods(runner.done, seed, args.method_list)
        ]

    def stage(name, cmd, *inputs, services=(), skip=None, outputs=(), env=None):
        return Stage(f"seed{seed}/{name}", cmd=cmd, inputs=inputs, services=services,
                     skip=skip, outputs=outputs, env=env)  # fmt: skip

    report = Path(args.report) / f"seed{seed}"
    methods = {
        "skd": stage("skd", trainer("skd", "skd", shards_all), shards_all),
        "seqkd": stage("seqkd", trainer("seqkd", "seqkd", shards_all, "data.keep=success"),
                       shards_all, skip=seqkd_skip(shards_all)),
        "onpolicy": stage("onpolicy", trainer("onpolicy", "onpolicy", shards_all, *live),
                          shards_all, services=[teacher]),
        "rounds": stage("rounds", rounds, exp),
    }  # fmt: skip
    # Rounds need no teacher rollouts (the student plays); the other three train on them.
    needs_rollouts = set(args.method_list) - {"rounds"}
    return [
        *([stage("rollouts", rollout(shards_all), exp, outputs=[shards_all],
                 env=cfg.engine.batch_env())]
          if needs_rollouts else []),
        *(methods[m] for m in args.method_list),
        stage("eval", eval_command(args, cfg, "test", report, [later_args(trained_models)]),
              outputs=[report / "agent_results.json"], env=cfg.engine.batch_env()),
    ]  # fmt: skip


def plan(args, cfg: AgentDemoConfig, runner: Runner) -> list[Stage]:
    return [
        experience_stage(args, cfg),
        dev_stage(args, cfg),
        *(s for seed in args.seed_list for s in seed_stages(args, cfg, seed, runner)),
    ]


def main(argv=None) -> int:
    args = parse_args(argv)
    cfg = load_demo_config(args.config)
    if args.test_episodes < MIN_TEST_EPISODES:
        print(f"note: {args.test_episodes} test episodes, fewer than the demo's "
              f"{MIN_TEST_EPISODES}: a check, not a measurement", flush=True)  # fmt: skip
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    runner = Runner(work / "stages.json", settings=settings(args))
    write_env_files(args, cfg)
    t0 = time.time()
    for line in forget_stale_evals(runner, args.seed_list, args.method_list):
        print(f"note: {line} (the other models' episodes are cached)", flush=True)
    runner.run(plan(args, cfg, runner))
    from bench.demo_agent_report import write_summary

    # Every seed evaluated in this folder, those of earlier runs included.
    seeds = sorted(set(args.seed_list) | evaluated_seeds(runner.done))
    summary = write_summary(Path(args.report), seeds, runner.done, command=argv_command(argv))
    print(f"\nAgent demo done in {time.time() - t0:.0f} s. Summary: {summary}")
    return 0


def evaluated_seeds(stages_done: dict) -> set[int]:
    """The seeds whose test evaluation finished (stages.json's seed<S>/eval)."""
    return {
        int(name[4 : -len("/eval")])
        for name in stages_done
        if name.startswith("seed") and name.endswith("/eval")
    }


def argv_command(argv) -> str:
    return shlex.join(["python", "-m", "bench.demo_agent", *(argv or sys.argv[1:])])


if __name__ == "__main__":
    sys.exit(main())
