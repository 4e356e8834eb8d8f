"""data.keep=success: training on the agent episodes the teacher solved, from a folder that
holds every episode (rollout rows record the outcome in meta["episode"]).

Checked against the folder's own rows: every successful row once per epoch and no other,
exact resume at several cuts, and one clear error for a folder without outcomes or without
one successful episode (the reader loops over epochs, so it would otherwise never end).
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from shards.errors import ShardError
from shards.reader import ShardReader
from tests.shards_helpers import make_row, write_examples
from train.batches import ShardBatches

N_ROWS = 37


def write_episodes(folder, successes: list[bool | None]) -> None:
    """One row per episode; None writes a row without the episode record."""
    rng = np.random.default_rng(5)
    examples = []
    for i, won in enumerate(successes):
        row = make_row(rng, f"ep{i:03d}", max_len=12)
        meta = None if won is None else {"episode": {"seed": i, "success": won, "score": 1.0}}
        row.meta = meta
        examples.append([row])
    write_examples(folder, examples, batch_tokens=120)


@pytest.fixture(scope="module")
def episodes(tmp_path_factory):
    folder = tmp_path_factory.mktemp("keep") / "rollouts"
    won = [bool(x) for x in np.random.default_rng(1).random(N_ROWS) < 0.35]
    write_episodes(folder, won)
    return folder, {f"ep{i:03d}" for i, w in enumerate(won) if w}


def batches(folder, keep: str, epochs: int | None = 1) -> ShardBatches:
    reader = ShardReader(folder, seed=2, epochs=epochs)
    return ShardBatches(
        reader, batch_tokens=90, max_rows=3, max_length=200, sort_window=5, keep=keep
    )


def test_success_keeps_the_solved_episodes_once_and_resumes_exactly(episodes):
    folder, solved = episodes
    assert 3 < len(solved) < N_ROWS - 3
    every = list(batches(folder, "success"))
    ids = [i for b in every for i in b.ids]
    assert sorted(ids) == sorted(solved)  # each once, no other
    assert sorted(i for b in batches(folder, "all") for i in b.ids) == sorted(
        f"ep{i:03d}" for i in range(N_ROWS)
    )
    for cut in (1, len(every) // 2, len(every) - 1):
        first = batches(folder, "success")
        it = iter(first)
        for _ in range(cut):
            first.update(next(it))
        resumed = batches(folder, "success")
        resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))
        assert [b.ids for b in resumed] == [b.ids for b in every[cut:]], cut


def test_rows_without_outcome_or_without_a_success_are_one_error(tmp_path):
    plain = tmp_path / "plain"
    write_episodes(plain, [True, None, False])
    with pytest.raises(ShardError) as e:
        list(batches(plain, "success"))
    assert "meta.episode.success" in str(e.value) and "ep001" in str(e.value)
    assert str(plain) in str(e.value)
    lost = tmp_path / "lost"
    write_episodes(lost, [False] * 6)
    # epochs=None (training): without the check this would read epochs forever.
    with pytest.raises(ShardError, match="no successful episode"):
        next(iter(batches(lost, "success", epochs=None)))
