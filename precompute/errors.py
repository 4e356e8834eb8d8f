"""Expected failures of a precompute job and their one-line messages.

One list for the CLI and for the job's spawned workers, so that an error a worker meets
(a full disk, a read-only folder, a bad row) reaches the user as the same
`precompute: error: FILE:LINE: FIELD: MESSAGE` lines as in a one-worker run; anything else
is a bug and keeps its traceback.
"""

from __future__ import annotations

from precompute.config import ConfigError
from precompute.inputs import InputError, InputFileError
from precompute.launch import LaunchError
from precompute.run import TokenizerMismatch
from shards.errors import ShardError

SHOWN_REJECTS = 20  # bad rows listed on stderr; --skip-invalid's rejects file holds them all


class WorkerFailed(RuntimeError):
    """A worker stopped with an error, or died more often than max_retries allows. Its
    message has one line per problem, each naming the worker."""

    @classmethod
    def of(cls, worker: int, lines: list[str]) -> WorkerFailed:
        """Worker `worker`'s error lines (from `error_lines`), each prefixed with its name."""
        return cls("\n".join(f"worker w{worker}: {line}" for line in lines))


def expected_errors() -> tuple[type[BaseException], ...]:
    """The exception types that end a run with `error_lines` instead of a traceback."""
    return (
        InputError,
        InputFileError,
        ConfigError,
        TokenizerMismatch,
        ShardError,
        LaunchError,
        OSError,  # the output folder: read-only, a full disk, a missing parent ...
    )


def error_lines(e: BaseException, out: str | None = None) -> list[str]:
    """`FILE:LINE: FIELD: MESSAGE` lines (the parts that apply) for an expected error."""
    if isinstance(e, WorkerFailed):
        return str(e).splitlines()
    if isinstance(e, InputError):
        lines = [r.message() for r in e.rejects[:SHOWN_REJECTS]]
        if len(e.rejects) > SHOWN_REJECTS:
            lines.append(f"... and {len(e.rejects) - SHOWN_REJECTS} more invalid row(s)")
        lines.append(
            f"{len(e.rejects)} invalid input row(s) of {e.total}: fix them, or pass "
            "--skip-invalid to list them in a rejects file and go on"
        )
        return lines
    if isinstance(e, InputFileError):
        return [f"{e.path}:{e.line}: {e.message}" if e.line else f"{e.path}: {e.message}"]
    if isinstance(e, ShardError):
        where = [e.path] if e.path else []
        if e.row is not None:
            where.append(f"row {e.row}")
        if e.field:
            where.append(e.field)
        return [": ".join([":".join(where[:2]), *where[2:], e.message] if where else [e.message])]
    if isinstance(e, OSError):
        if e.filename is not None:
            return [f"{e.filename}: {e.strerror or e}"]
        if out is not None and e.errno is not None:  # pyarrow's write errors name no file
            return [f"{out}: {' '.join(str(e).split())}"]
    return [" ".join(str(e).split())]
