"""Experience: the teacher's privileged text for a game, and where it came from.

An experience file is JSON: {"text": "...", "source": {...}}. The source says how the text was
made (builder, game, params, fold, seeds, ...) and is recorded in the shard metadata of every
rollout that uses it. Experience may only be read off the train fold: load_experience refuses a
source whose fold is not "train", so no dev- or test-fold seed ever feeds it.
"""

from __future__ import annotations

import json
import re
from collections import Counter
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


# ---- builders: experience read off train-fold gold episodes ----------------------------------

BUILDERS = (
    "rules",
    "categories",
    "howto",
    "demo",
    "demo3",
    "demo+nearest",
    "howto+categories",
    "nearest",
    "similar",
)
PER_EPISODE = ("nearest", "similar", "demo+nearest")
# "nearest" and "similar" are per episode: the text holds one line per train object (its place;
# the winning actions of its episode), and `for_episode` keeps what belongs to the train
# objects most like the objects this episode's first observation offers to take
# (source["per_episode"] is true; envs.runner.play then takes a callable).


@dataclass(frozen=True)
class GoldEpisode:
    """A train-fold episode played along the game's gold actions: observations[i] is what was
    seen before actions[i] (one more at the end)."""

    seed: int
    task: str
    observations: tuple[str, ...]
    valid_actions: tuple[tuple[str, ...], ...]
    actions: tuple[str, ...]
    success: bool


def train_gold_episodes(env, seeds) -> list[GoldEpisode]:
    """The gold episodes of `seeds`, read on the TRAIN fold only: a seed that is not a
    train-fold seed of env's game is refused (the folds' seeds are disjoint), so no dev- or
    test-fold episode can feed an experience."""
    train = set(env.fold_seeds("train"))
    outside = [s for s in seeds if s not in train]
    if outside:
        raise ExperienceError(
            f"seeds: {outside[:5]} are not train-fold seeds; experience is built from the "
            "train fold only"
        )
    if len(set(seeds)) != len(seeds):
        raise ExperienceError(f"seeds: repeated seeds in {list(seeds)[:10]}")
    out = []
    for seed in seeds:
        actions = env.gold_actions(seed, "train")
        obs = env.reset(seed, "train")
        observations, valid = [obs.text], [obs.valid_actions]
        for action in actions:
            obs = env.step(action)
            observations.append(obs.text)
            valid.append(obs.valid_actions)
        out.append(
            GoldEpisode(
                seed, obs.task, tuple(observations), tuple(valid), tuple(actions), obs.success
            )
        )
    return out


_PUT = re.compile(r"^put (.+) (?:in|on) (.+)$")


def placements(episodes) -> dict[str, Counter]:
    """object -> Counter(place) over the gold `put OBJECT in|on PLACE` actions."""
    out: dict[str, Counter] = {}
    for ep in episodes:
        for action in ep.actions:
            m = _PUT.match(action)
            if m:
                out.setdefault(m.group(1), Counter())[m.group(2)] += 1
    return out


def _place(counts: Counter) -> str:
    return sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[0][0]


def rules_text(episodes) -> str:
    """Every train object with the place it went to most often, one per line."""
    return "\n".join(f"- {obj}: {_place(c)}" for obj, c in sorted(placements(episodes).items()))


def word_places(episodes, min_objects: int = 3, min_share: float = 0.8) -> dict[str, str]:
    """word -> place where the train objects whose name holds the word went (at least
    min_objects objects, at least min_share of them to that one place)."""
    by_word: dict[str, Counter] = {}
    for obj, counts in placements(episodes).items():
        for word in set(obj.lower().split()):
            by_word.setdefault(word, Counter())[_place(counts)] += 1
    out = {}
    for word, counts in sorted(by_word.items()):
        place, n = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[0]
        if sum(counts.values()) >= min_objects and n / sum(counts.values()) >= min_share:
            out[word] = place
    return out


def categories_text(episodes) -> str:
    """Word rules: 'Anything wet goes in the clothes drier.', grouped by place."""
    by_place: dict[str, list[str]] = {}
    for word, place in word_places(episodes).items():
        by_place.setdefault(place, []).append(word)
    return "\n".join(
        f"- {', '.join(words)} things go in the {place}."
        for place, words in sorted(by_place.items())
    )


def howto_text(episodes) -> str:
    """The shape of the train gold paths with the objects and places taken out, the most
    common first: what to do, in what order."""
    shapes: Counter = Counter()
    for ep in episodes:
        shape = []
        for action in ep.actions:
            verb = action.split()[0]
            if verb in ("look", "inventory"):
                continue
            shape.append(verb)
        shapes[" -> ".join(shape)] += 1
    common, n = sorted(shapes.items(), key=lambda kv: (-kv[1], kv[0]))[0]
    lines = [
        f"- In {n} of {len(episodes)} earlier games the winning actions were: {common}.",
        "- Take an object you see, then open the place where it belongs if it is closed, "
        "then put the object there.",
        "- Do not repeat look around or inventory; every turn, choose an action that moves "
        "the task forward.",
    ]
    return "\n".join(lines)


# Between demo+nearest's worked game and its table (for_episode keeps the demo, reads the table).
TABLE_MARK = "\n\nWhere objects went in earlier games:\n"


def demo_text(episodes, n: int = 1) -> str:
    """n worked train episodes: the first observation and the gold actions with what each
    led to (the shortest successful ones, ties by seed, each taking another object)."""
    picked, objects = [], set()
    for ep in sorted((e for e in episodes if e.success), key=lambda e: (len(e.actions), e.seed)):
        taken = frozenset(a for a in ep.actions if a.startswith("take "))
        if taken & objects:
            continue  # another object each: a small model copies a repeated object's place
        picked.append(ep)
        objects |= taken
        if len(picked) == n:
            break
    games = []
    for ep in picked:
        lines = [f"An earlier game: {ep.observations[0].strip()}"]
        for action, obs in zip(ep.actions, ep.observations[1:], strict=True):
            if action in ("look around", "inventory"):
                continue
            lines.append(f"> {action}\n{obs.strip()}")
        games.append("\n".join(lines))
    return "\n\n".join(games)


def nearest_lines(episodes) -> str:
    """One line per train object: 'OBJECT: PLACE' (for_episode picks among them)."""
    return rules_text(episodes)


def similar_lines(episodes) -> str:
    """One line per train object taken first in a gold episode: 'OBJECT: A | B | C', the
    episode's gold actions without look around / inventory (the first episode of an object,
    by seed)."""
    out: dict[str, str] = {}
    for ep in sorted(episodes, key=lambda e: e.seed):
        actions = [a for a in ep.actions if a not in ("look around", "inventory")]
        take = next((a for a in actions if a.startswith("take ")), None)
        if take is not None and take[5:] not in out:
            out[take[5:]] = " | ".join(actions)
    return "\n".join(f"- {obj}: {acts}" for obj, acts in sorted(out.items()))


def build_experience(builder: str, episodes, game: str, params: str) -> Experience:
    """The experience `builder` makes of train-fold gold episodes (train_gold_episodes)."""
    if builder not in BUILDERS:
        raise ExperienceError(f"builder: unknown builder {builder!r}; valid: {', '.join(BUILDERS)}")
    parts = {
        "rules": lambda: "Where objects belong (from earlier games):\n" + rules_text(episodes),
        "categories": lambda: (
            "Where objects belong (from earlier games):\n" + categories_text(episodes)
        ),
        "howto": lambda: howto_text(episodes),
        "demo": lambda: demo_text(episodes),
        "demo3": lambda: demo_text(episodes, 3),
        "demo+nearest": lambda: demo_text(episodes) + TABLE_MARK + nearest_lines(episodes),
        "howto+categories": lambda: (
            howto_text(episodes) + "\nWhere objects belong:\n" + categories_text(episodes)
        ),
        "nearest": lambda: nearest_lines(episodes),
        "similar": lambda: similar_lines(episodes),
    }
    source = {
        "builder": builder,
        "game": game,
        "params": params,
        "fold": "train",
        "seeds": sorted(e.seed for e in episodes),
        "per_episode": builder in PER_EPISODE,
    }
    return Experience(parts[builder](), source)


def _most_alike(table: dict[str, str], obj: str, k: int) -> list[tuple[float, str]]:
    """The k train objects of `table` sharing the most rare words with obj: (-weight, name),
    weight = sum over shared words of 1 / (train objects holding the word); ties by name;
    only objects sharing a word."""
    df = Counter(w for o in table for w in set(o.lower().split()))
    words = set(obj.lower().split())
    scored = sorted((-sum(1.0 / df[w] for w in words & set(o.lower().split())), o) for o in table)
    return [(s, o) for s, o in scored[:k] if s < 0]


def for_episode(experience: Experience, valid_actions, k: int = 2) -> str:
    """The text a per-episode experience gives one episode, from the objects its first
    observation offers to take ('take OBJECT'); a whole-config experience is returned as it is.

    nearest: for each object, the place its k most alike train objects went to (votes
    weighted as in _most_alike), as an instruction. similar: for each object, the winning
    actions of the train episode of its most alike train object."""
    if not experience.source.get("per_episode"):
        return experience.text
    demo, _, text = experience.text.rpartition(TABLE_MARK)  # demo+nearest: the demo, then the table
    table = {}
    for line in text.splitlines():
        obj, _, value = line[2:].partition(": ")
        table[obj] = value
    similar = experience.source.get("builder") == "similar"
    lines = []
    for action in valid_actions:
        if not action.startswith("take "):
            continue
        obj = action[5:]
        alike = _most_alike(table, obj, 1 if similar else k)
        if not alike:
            continue
        if similar:
            lines.append(f"Actions that won an earlier game like this one ({alike[0][1]}):")
            lines.extend(table[alike[0][1]].split(" | "))
            continue
        votes: Counter = Counter()
        for score, o in alike:
            votes[table[o]] += -score
        place = sorted(votes.items(), key=lambda kv: (-kv[1], kv[0]))[0][0]
        like = ", ".join(o for _, o in alike)
        lines.append(
            f"- The {obj} belongs in the {place} (like the {like} of earlier games): "
            f"take {obj}, open {place} if it is closed, put {obj} in {place}."
        )
    return "\n\n".join(t for t in (demo, "\n".join(lines)) if t)


def main(argv=None) -> int:
    """python -m envs.experience --game twc --params numLocations=1,... --builder NAME
    --train-seeds 0-299 --out FILE: the experience of train-fold gold episodes, as a file."""
    import argparse

    from envs.config import EnvConfig
    from envs.textworld import TextWorldEnv

    ap = argparse.ArgumentParser(description=main.__doc__.splitlines()[0])
    ap.add_argument("--game", required=True)
    ap.add_argument("--params", default="", help="name=value,... (the engine's gameParams)")
    ap.add_argument("--builder", required=True, choices=BUILDERS)
    ap.add_argument("--train-seeds", required=True, help="train-fold seeds: A-B or a,b,c")
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    params = {}
    for item in filter(None, args.params.split(",")):
        name, _, value = item.partition("=")
        if not value.strip().isdigit():
            raise SystemExit(f"--params: {item!r}: expected name=integer")
        params[name.strip()] = int(value)
    if "-" in args.train_seeds:
        lo, _, hi = args.train_seeds.partition("-")
        seeds = list(range(int(lo), int(hi) + 1))
    else:
        seeds = [int(s) for s in args.train_seeds.split(",")]
    config = EnvConfig(game=args.game, params=params, fold="train")
    env = TextWorldEnv(config)
    try:
        episodes = train_gold_episodes(env, seeds)
    except ExperienceError as e:
        raise SystemExit(f"envs.experience: {e}") from None
    finally:
        env.close()
    experience = build_experience(args.builder, episodes, args.game, config.game_params())
    save_experience(experience, args.out)
    print(f"envs.experience: {args.builder} from {len(seeds)} train-fold episodes -> {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
