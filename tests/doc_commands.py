"""The shell commands that README.md and docs/*.md tell a user to type, and how each is tried.

Which fences count: a fenced block whose info string starts with `sh`, `bash`, `shell`,
`console` or `zsh`. An unlabeled fence is a file listing or an example of a format, never a
command (test_documented_commands checks that no unlabeled fence starts like a command, so a
command cannot hide in one). In a `console` block only `$ ` lines are commands (the rest is
output); elsewhere a leading `$ ` is dropped. A block that starts with `#!` is a script file
(a SLURM batch script), one command as a whole. Otherwise a command is one line plus its `\\`
continuations; comment lines and trailing `# ...` comments are dropped; `&&` chains stay one
command (the second part runs only after the first, as the reader would type it).

Each command is RUN unless a rule of CHECK_ONLY matches one of its parts, or it runs as an
earlier command did (test_documented_commands.repeats: the same words once sized for the test);
a new command in the docs is therefore run without editing anything here. Check-only commands
are checked as far as they can be without running them (`check_only_steps`).
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass
from pathlib import Path

FENCE_LANGS = ("sh", "bash", "shell", "console", "zsh")
DOC_GLOBS = ("README.md", "docs/*.md")

# A command's start: `VAR=value` words, then the program.
CMD = r"^(?:\w+=\S*\s+)*"

# Why a command is not run here: (regex searched in one part of the command, reason).
# The first match wins; the reason is the test's message and the table in one place.
CHECK_ONLY: tuple[tuple[str, str], ...] = (
    (r"^#!", "a batch script for a SLURM cluster (sbatch)"),
    (r"\b(sbatch|srun)\b", "needs a SLURM cluster"),
    (r"\bGPUS=([2-9]|\d\d)", "needs several GPUs (torchrun)"),
    (r"\bZERO=\d", "DeepSpeed ZeRO needs GPUs"),
    (r"tensor_parallel_size=([2-9]|\d\d)", "tensor parallelism needs several GPUs"),
    (r"^ray start\b|\bRAY_ADDRESS=", "needs a Ray cluster of several machines"),
    (r"\bs3://|\bgs://", "needs object-store credentials"),
    (
        CMD + r"make (demo|demo-onpolicy|demo-agent)\b",
        "the demo: 20 min to 2 h on 2 cores with SmolLM2",
    ),
    (r"-m (tools|bench)\.demo", "the demo: 20 min to 2 h on 2 cores with SmolLM2"),
    (CMD + r"make bench-|-m bench\.", "a benchmark: minutes to hours, with the SmolLM2 models"),
    (
        CMD + r"make teacher-server\b",
        "a server in the foreground until Ctrl-C (tests/test_onpolicy.py starts the same one)",
    ),
    (r"vllm\.entrypoints\.openai\.api_server|\bvllm serve\b", "a server in the foreground"),
    (r"\bTEACHER_URL=", "talks to a server started in another terminal"),
    (
        r"teacher_url=https?://(?!localhost\b|127\.)",
        "talks to a teacher server on another machine",
    ),
    # Run end to end by other tests; one documented command still runs each target here.
    (
        CMD + r"make precompute (?=.*\bK=64\b)(?!.*\b(STUDENT|CONFIG|RAY)=)",
        "K=64 is precompute's default k: the command after it (README.md, docs/precompute.md)"
        " runs this target on the same teacher and data with a vLLM engine, plus STUDENT= (its"
        " tokenizer check); another engine start costs half a minute of the suite",
    ),
    (
        CMD + r"make onpolicy-two-stage\b",
        "tests/test_onpolicy.py::test_two_stage_in_one_command_starts_on_policy_from_skds_weights"
        " runs tools.onpolicy.live --two-stage end to end; `make onpolicy-live`, run here, starts"
        " the teacher server as this target does",
    ),
    (
        CMD + r"make onpolicy-rounds\b(?!.*--teacher-shards)",
        "docs/onpolicy.md's rounds command runs this target here (with --teacher-shards), and"
        " tests/test_rounds.py::test_two_rounds_killed_and_resumed runs two rounds end to end",
    ),
    (
        r"-m tools\.eval agent\b",
        "plays hundreds of episodes with a vLLM engine per model and Java games (minutes); "
        "tests/test_eval_agent.py::test_cli_plays_reports_and_caches runs the same CLI end to "
        "end on a pure-Python game and a fake engine",
    ),
    (
        r"-m tools\.onpolicy\.(rounds|episodes)\b.*--env-config|\bonpolicy\.env_config=",
        "episodes (rounds, live) play TextWorldExpress (Java) with SmolLM2: "
        "tests/test_onpolicy_env.py::test_an_episode_round_scores_whole_episodes_in_the_teacher_view"
        " runs a round's stages on the tiny model",
    ),
    (CMD + r"make (setup|test|lint|format)\b", "re-creates .venv or runs the whole suite"),
    (CMD + r"make (models|clean-models)\b|-m tools\.models\b", "converts or deletes SmolLM2"),
    (r"\bpip3? install\b|\buv (pip|add)\b", "installs into the environment"),
    (r"\b(git clone|curl|wget)\b", "needs the network"),
    (
        r"\bdata/alfworld/",
        "the conversation layouts' example files: tests/test_precompute_conversations.py runs "
        "both layouts on the tiny model; another vLLM start costs a minute of the suite",
    ),
    (
        r"\bmode=rollout\b|agent-rollout\.yaml",
        "teacher rollouts play a text game with the teacher: "
        "tests/test_precompute_rollout.py::test_real_textworld_express_twc plays twc end to end "
        "on the tiny model; another vLLM start costs a minute of the suite",
    ),
)


@dataclass(frozen=True)
class DocCommand:
    """One command as the reader types it; `where` is file:line of its first line."""

    file: str
    line: int
    text: str

    @property
    def where(self) -> str:
        return f"{self.file}:{self.line}"

    def parts(self) -> list[str]:
        """The `&&`-separated parts (a script is one part)."""
        if self.text.startswith("#!"):
            return [self.text]
        return [p.strip() for p in re.split(r"\s&&\s", self.text) if p.strip()]

    def check_only_reason(self) -> str | None:
        for part in self.parts():
            for pattern, reason in CHECK_ONLY:
                if re.search(pattern, part, re.M):
                    return reason
        return None


def _strip_comment(line: str) -> str:
    """`line` without a trailing `# ...` that is outside quotes (as bash reads it)."""
    quote = None
    for i, ch in enumerate(line):
        if quote:
            if ch == quote:
                quote = None
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i].rstrip()
    return line.rstrip()


def block_commands(file: str, start: int, lang: str, lines: list[str]) -> list[DocCommand]:
    """The commands of one fenced block whose first content line is line `start` of `file`."""
    if lines and lines[0].startswith("#!"):
        return [DocCommand(file, start, "\n".join(lines).strip() + "\n")]
    out: list[DocCommand] = []
    pending: list[str] = []
    first = 0
    for offset, raw in enumerate(lines):
        line = raw.strip()
        if not pending:
            if lang == "console" and not line.startswith("$ "):
                continue  # output shown beside the commands
            line = line.removeprefix("$ ")
            if not line or line.startswith("#"):
                continue
            first = start + offset
        line = _strip_comment(line)
        if line.endswith("\\"):
            pending.append(line[:-1].strip())
            continue
        pending.append(line)
        out.append(DocCommand(file, first, " ".join(p for p in pending if p)))
        pending = []
    if pending:
        raise ValueError(f"{file}:{first}: a command ends with '\\' and no next line")
    return out


FENCE = re.compile(r"^(\s*)(```+|~~~+)\s*([\w+-]*)")


def fenced_blocks(path: Path) -> list[tuple[int, str, list[str]]]:
    """(line of the first content line, info string's first word, lines) per fenced block."""
    blocks, inside, marker, lang, body, start = [], False, "", "", [], 0
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        m = FENCE.match(line)
        if not inside and m:
            inside, marker, lang, body, start = True, m.group(2), m.group(3).lower(), [], n + 1
        elif inside and line.strip().startswith(marker) and not line.strip()[len(marker) :]:
            blocks.append((start, lang, body))
            inside = False
        elif inside:
            body.append(line)
    return blocks


def doc_files(root: Path) -> list[Path]:
    return sorted({p for g in DOC_GLOBS for p in root.glob(g)})


def documented_commands(root: Path) -> list[DocCommand]:
    """Every command of the counted fences of README.md and docs/*.md, in document order."""
    cmds: list[DocCommand] = []
    for path in doc_files(root):
        rel = str(path.relative_to(root))
        for start, lang, body in fenced_blocks(path):
            if lang in FENCE_LANGS:
                cmds.extend(block_commands(rel, start, lang, body))
    return cmds


LOOKS_LIKE_COMMAND = re.compile(r"^\s*(\$ )?(make|python3?|pip|bash|torchrun|ray|sbatch) ")


def unlabeled_command_blocks(root: Path) -> list[str]:
    """file:line of unlabeled fences whose first line reads like a command (they would be
    skipped: label them `sh`)."""
    found = []
    for path in doc_files(root):
        for start, lang, body in fenced_blocks(path):
            first = next((b for b in body if b.strip()), "")
            if not lang and LOOKS_LIKE_COMMAND.match(first):
                found.append(f"{path.relative_to(root)}:{start}")
    return found


def python_modules(part: str) -> list[str]:
    """The `python -m MODULE` modules a command part runs."""
    return re.findall(r"\bpython3?\s+-m\s+([\w.]+)", part)


def program(part: str) -> str:
    """The program a part runs: its first word after `VAR=value` assignments."""
    for word in shlex.split(part, comments=True):
        if not re.match(r"^\w+=", word):
            return word
    return ""
