"""Experience: the teacher's privileged text for a game, and where it came from.

An experience file is JSON: {"text": "...", "source": {...}}. The source says how the text was
made (builder, game, params, fold, seeds, ...) and is recorded in the shard metadata of every
rollout that uses it. Experience may only be read off the train fold: load_experience refuses a
source whose fold is not "train", so no dev- or test-fold seed ever feeds it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path


class ExperienceError(ValueError):
    """An experience file that cannot be used (unreadable, malformed, not from the train fold)."""


@dataclass(frozen=True)
class Experience:
    text: str
    source: dict = field(default_factory=dict)  # builder, game, params, fold ("train"), seeds

    def to_json(self) -> dict:
        return {"text": self.text, "source": self.source}


def save_experience(experience: Experience, path: str | Path) -> None:
    if experience.source.get("fold") != "train":
        raise ExperienceError(
            f"{path}: source.fold is {experience.source.get('fold')!r}; experience is built "
            "from the train fold only"
        )
    Path(path).write_text(json.dumps(experience.to_json(), indent=1) + "\n", encoding="utf-8")


def load_experience(path: str | Path) -> Experience:
    """The experience in `path`; one line naming the file and field for anything wrong."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise ExperienceError(f"{path}: cannot read the experience file: {e}") from e
    if not isinstance(data, dict) or not isinstance(data.get("text"), str):
        raise ExperienceError(f'{path}: text: expected {{"text": str, "source": {{...}}}}')
    source = data.get("source")
    if not isinstance(source, dict):
        raise ExperienceError(f"{path}: source: expected an object saying how the text was made")
    if source.get("fold") != "train":
        raise ExperienceError(
            f"{path}: source.fold: {source.get('fold')!r}; experience is built from the train "
            "fold only (no dev- or test-fold seed may feed it)"
        )
    return Experience(data["text"], source)
