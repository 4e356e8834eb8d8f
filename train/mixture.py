"""A weighted mixture of shard folders: each micro-batch comes from one folder, drawn at random.

Typical mixtures: a teacher's thinking and non-thinking outputs, two teachers, or a teacher
plus the student's own on-policy rounds (tools/onpolicy/rounds.py). The folders must share the
student's tokenizer; their k, teacher and sampling may differ.

Sampling is by trained tokens. Micro-batch n draws folder i with probability proportional to
w_i / m_i, where m_i is the mean number of trained tokens in folder i's batches so far, so
that folder i's expected share of the trained tokens is its weight w_i, whatever its response
lengths. (By rows or by batches, a folder of long responses would take more than its weight.)
A batch never mixes folders: the teacher's top-k K of a batch is then one number, and folders
with different k train side by side without padding or truncating anyone's top-k.

The draw of micro-batch n is seeded by (seed, n), and the folder means come from the batches
trained so far, so the state is each folder's own reader position plus the counts of
micro-batches, batches and tokens per folder: resume is exact.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import numpy as np

from train.batches import Batch, BatchSource, ShardBatches

DRAW = 2  # seed stream of the folder draws (train/onpolicy.py uses 0 and 1)


def choose_folder(
    seed: int, n: int, weights: np.ndarray, tokens: list[int], batches: list[int]
) -> int:
    """Folder of micro-batch n: P(i) proportional to weights[i] / (mean tokens per batch of i).

    A folder not drawn yet counts with the mean of those that were (all equal at the start),
    so the first draws follow the weights as they are.
    """
    seen = [t / b for t, b in zip(tokens, batches, strict=True) if b]
    prior = float(np.mean(seen)) if seen else 1.0
    means = np.array([t / b if b else prior for t, b in zip(tokens, batches, strict=True)])
    p = weights / np.maximum(means, 1e-9)
    u = np.random.default_rng([seed, n, DRAW]).random() * p.sum()
    return min(int(np.searchsorted(np.cumsum(p), u, side="right")), len(p) - 1)


class MixtureBatches(BatchSource):
    """A BatchSource over several `ShardBatches`, one per folder (see the module doc)."""

    def __init__(self, parts: list[ShardBatches], paths: list[str], weights: list[float], seed):
        if not len(parts) == len(paths) == len(weights) >= 2:
            raise ValueError("a mixture needs two or more folders, each with a weight")
        self.parts, self.paths, self.seed = parts, [str(p) for p in paths], seed
        self.weights = np.asarray(weights, dtype=np.float64) / float(np.sum(weights))
        self.drawn = 0  # micro-batches the trainer consumed
        self.tokens = [0] * len(parts)  # trained tokens per folder
        self.batches = [0] * len(parts)
        self._loaders = None

    @property
    def names(self) -> list[str]:
        """Short names for the logs: the folder names, with their index where they repeat."""
        base = [Path(p.rstrip("/")).name or p for p in self.paths]
        dup = {b for b in base if base.count(b) > 1}
        return [f"{i}-{b}" if b in dup else b for i, b in enumerate(base)]

    def folders(self) -> list[ShardBatches]:
        return list(self.parts)

    def bind(self, load: Callable[[ShardBatches], Iterable[Batch]]) -> MixtureBatches:
        """Iterate over one loader per folder (`load(part)`, with its own workers)."""
        self._loaders = [part.bind(load) for part in self.parts]
        return self

    def __iter__(self) -> Iterator[Batch]:
        streams = [iter(x) for x in (self._loaders or self.parts)]
        n, tokens, batches = self.drawn, list(self.tokens), list(self.batches)
        while True:
            i = choose_folder(self.seed, n, self.weights, tokens, batches)
            batch = next(streams[i])
            batch.folder = i
            n, tokens[i], batches[i] = n + 1, tokens[i] + batch.num_tokens, batches[i] + 1
            yield batch

    def update(self, batch: Batch) -> None:
        """Record a batch the trainer consumed (batches are consumed in the order yielded)."""
        self.parts[batch.folder].update(batch)
        self.drawn += 1
        self.tokens[batch.folder] += batch.num_tokens
        self.batches[batch.folder] += 1

    def pop_metrics(self) -> dict:
        """Each folder's share of the tokens trained so far (this rank's)."""
        total = max(sum(self.tokens), 1)
        out = {f"mix/{name}": t / total for name, t in zip(self.names, self.tokens, strict=True)}
        for part in self.parts:  # rows over max_length, all folders together
            for k, v in part.pop_metrics().items():
                out[k] = out.get(k, 0) + v
        return out

    def state_dict(self) -> dict:
        return {
            "paths": self.paths,
            "weights": self.weights.tolist(),
            "drawn": self.drawn,
            "tokens": list(self.tokens),
            "batches": list(self.batches),
            "folders": [p.state_dict() for p in self.parts],
        }

    def load_state_dict(self, state: dict) -> None:
        for key in ("paths", "weights"):
            mine = self.state_dict()[key]
            if state.get(key) != mine:
                raise ValueError(
                    f"mixture state was saved with {key}={state.get(key)!r}, this run has "
                    f"{mine!r}: resuming would not continue the same mixture"
                )
        for part, s in zip(self.parts, state["folders"], strict=True):
            part.load_state_dict(s)
        self.drawn = int(state["drawn"])
        self.tokens = [int(t) for t in state["tokens"]]
        self.batches = [int(b) for b in state["batches"]]
