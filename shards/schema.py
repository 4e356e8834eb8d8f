"""Shard format v2: the Arrow schema, the per-file metadata, and what must match across files.

One row is one conversation: prompt_ids ++ response_ids, with the trained spans (v2) of the
response. Token columns are Arrow lists; the teacher's top-k of the trained tokens is stored
as the integer streams of `shards.codec` (see docs/shard-format.md). Writers write v2;
readers also read v1 files (rows without span columns: one span, the whole response).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from datetime import UTC, datetime

import pyarrow as pa

from shards.codec import Codebook
from shards.errors import ShardError

FORMAT = "kdshards"
SCHEMA_VERSION = 2
SUPPORTED_SCHEMA_VERSIONS = (1, 2)
META_KEY = b"kdshards.metadata"
RANK_ORDER_KEY = b"kdshards.rank_order"
SOURCES = ("teacher", "dataset", "student")

# Row-level columns, then the per-token and per-entry streams of shards.codec.
ROW_FIELDS = [
    pa.field("id", pa.string(), nullable=False),
    pa.field("sample_index", pa.int32(), nullable=False),
    pa.field("source", pa.string(), nullable=False),
    pa.field("thinking", pa.bool_()),  # chat template's thinking mode, null when not applicable
    pa.field("meta", pa.string()),  # JSON object of per-row extras (reference answer, ...)
    pa.field("prompt_ids", pa.list_(pa.int32()), nullable=False),  # student view: Q
    pa.field("teacher_prompt_ids", pa.list_(pa.int32()), nullable=False),  # teacher view: Q+E
    pa.field("response_ids", pa.list_(pa.int32()), nullable=False),
]
# v2: trained spans and message starts, in conversation coordinates (offsets into
# prompt_ids ++ response_ids); turn_* are empty lists when the writer did not record them.
SPAN_FIELDS = [
    pa.field("span_starts", pa.list_(pa.int32()), nullable=False),
    pa.field("span_lengths", pa.list_(pa.int32()), nullable=False),
    pa.field("turn_starts", pa.list_(pa.int32()), nullable=False),
    pa.field("turn_roles", pa.list_(pa.string()), nullable=False),
]
CODEC_FIELDS = [
    pa.field("topk_rank_delta_lo", pa.list_(pa.uint8()), nullable=False),
    pa.field("topk_rank_delta_hi", pa.list_(pa.uint16()), nullable=False),
    pa.field("topk_level_lo", pa.list_(pa.uint8()), nullable=False),
    pa.field("topk_level_hi", pa.list_(pa.uint8()), nullable=False),
    pa.field("token_in_topk", pa.list_(pa.bool_()), nullable=False),
    pa.field("token_level", pa.list_(pa.uint16()), nullable=False),
    pa.field("tail_level", pa.list_(pa.uint16()), nullable=False),
    pa.field("extra_rank_delta", pa.list_(pa.uint32()), nullable=False),
    pa.field("extra_level", pa.list_(pa.uint16()), nullable=False),
]
PER_TOKEN = ("token_in_topk", "token_level", "tail_level")
PER_ENTRY = ("topk_rank_delta_lo", "topk_rank_delta_hi", "topk_level_lo", "topk_level_hi")
PER_EXTRA = ("extra_rank_delta", "extra_level")


def arrow_schema(version: int = SCHEMA_VERSION) -> pa.Schema:
    """The Arrow schema of files of schema `version`, without file metadata."""
    if version == 1:
        return pa.schema(ROW_FIELDS + CODEC_FIELDS)
    if version == 2:
        return pa.schema(ROW_FIELDS + SPAN_FIELDS + CODEC_FIELDS)
    raise ValueError(f"schema version {version!r} is not one of {SUPPORTED_SCHEMA_VERSIONS}")


@dataclass(frozen=True)
class ShardMetadata:
    """What a shard folder was made from. Every file in a folder carries the same values.

    `created_at` is informative and excluded from compatibility checks.
    """

    k: int
    vocab_size: int
    teacher: str
    teacher_fingerprint: str
    tokenizer_fingerprint: str
    logprobs_mode: str = "raw_logprobs"
    sampling: dict = field(default_factory=dict)
    data_fingerprint: str = ""
    codebook: Codebook | None = None
    extra: dict = field(default_factory=dict)
    schema_version: int = SCHEMA_VERSION
    created_at: str = ""

    def __post_init__(self):
        if self.k < 1 or self.k > self.vocab_size:
            raise ValueError(f"k={self.k} must be in [1, vocab_size={self.vocab_size}]")
        if self.vocab_size >= 1 << 24:
            raise ValueError(f"vocab_size {self.vocab_size} exceeds the 2^24 the codec supports")
        if self.codebook is None:
            object.__setattr__(self, "codebook", Codebook.for_k(self.k))
        if not self.created_at:
            now = datetime.now(UTC).isoformat(timespec="seconds")
            object.__setattr__(self, "created_at", now)

    def to_json(self) -> dict:
        d = dataclasses.asdict(self)
        d["codebook"] = self.codebook.to_json()
        return d

    @classmethod
    def from_json(cls, d: dict) -> ShardMetadata:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown metadata keys {sorted(unknown)}")
        d = dict(d)
        d["codebook"] = Codebook.from_json(d["codebook"])
        return cls(**d)

    def identity(self) -> dict:
        """The fields that must agree for files to belong to one folder."""
        d = self.to_json()
        d.pop("created_at")
        return d

    def mismatches(self, other: ShardMetadata) -> list[str]:
        a, b = self.identity(), other.identity()
        return [f"{key}: {a[key]!r} != {b[key]!r}" for key in a if a[key] != b[key]]

    def dumps(self) -> bytes:
        return json.dumps(self.to_json(), sort_keys=True).encode()


def check_schema_version(version, path) -> None:
    if version not in SUPPORTED_SCHEMA_VERSIONS:
        raise ShardError(
            path,
            f"schema version {version!r} is not supported by this reader "
            f"(supported: {list(SUPPORTED_SCHEMA_VERSIONS)})",
        )
