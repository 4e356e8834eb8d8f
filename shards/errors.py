"""One error type for everything that is wrong with shard data or its use."""

from __future__ import annotations

import re
from pathlib import Path


class ShardError(ValueError):
    """Bad shard data or a mismatch, naming the file and, where known, the row and field.

    Raised instead of letting pyarrow or numpy fail deep inside a read, so that a user sees
    which file to delete or regenerate.
    """

    def __init__(
        self,
        path: str | Path | None,
        message: str | None = None,
        *,
        row: int | None = None,
        field: str | None = None,
    ):
        if message is None:
            # One preformatted text: how torch's DataLoader re-raises an error of a worker
            # process (with the worker's traceback). Keep the error's own line.
            text = str(path)
            found = re.findall(r"^(?:shards\.errors\.)?ShardError: (.*)$", text, re.M)
            path, message = None, found[-1] if found else text
        self.path = None if path is None else str(path)
        self.row = row
        self.field = field
        self.message = message
        where = []
        if self.path is not None:
            where.append(self.path)
        if row is not None:
            where.append(f"row {row}")
        if field is not None:
            where.append(f"field {field!r}")
        super().__init__(f"{': '.join([', '.join(where), message]) if where else message}")
