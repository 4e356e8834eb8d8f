"""THE action-parsing rule: a model's reply -> the action the game gets.

1. exact: the reply equals a valid action after normalisation (lower case, punctuation
   and bullets dropped, whitespace collapsed): the valid action is sent.
2. mapped: otherwise the valid action with the highest token F1 against the reply (ties:
   difflib ratio, then alphabetical), if that F1 is at least MAP_THRESHOLD.
3. invalid: nothing reaches the threshold: the reply is sent as written (whitespace at its
   ends stripped), the game answers with its own "Unknown action" message, and it counts.

Why token F1 at 0.4 (`python -m bench.envs`, bench/results/envs.json): along 40 train
seeds' gold paths each gold action is rewritten the ways a small model writes it (article
added, filler words, the observation's first sentence before it, a word dropped, a typo,
a synonym verb, a plan appended), plus garbage replies and echoed observations that
should stay invalid. Share handled right, mean over the 9 kinds: twc (1 room, 2 items)
F1>=0.4 0.928, difflib ratio>=0.5 0.879 (0.59 on observation + action: a long reply drags
the character ratio down), token recall>=0.5 0.907; cookingworld (1 room) F1>=0.4 0.916,
difflib 0.818, recall 0.844. Higher thresholds lose more near misses than they save
garbage. Its price: a reply sharing one word with a two-word action reaches F1 0.4
("take the shoe" -> "take notebook"), and echoed observations are mapped about half the
time.

What the trained span holds: the action the game got (actions[i]), and the same action
stays in the history of later prompts. The conversation a student trains on is then one
the game really answered: each observation follows the action written before it, and a
teacher scoring the episode scores that action in that context. Training on the reply as
written would teach the student text the game never saw, in a history that contradicts
it (the next observation answers the mapped action). The reply as written is recorded
next to it (Episode.replies) with how it was parsed (Episode.action_kinds), so invalid and
mapped rates are measured, not hidden. For an invalid reply the game got the reply itself,
so both views agree.
"""

from __future__ import annotations

import difflib
import re
from collections import Counter
from dataclasses import dataclass

from envs.base import ActionKind

MAP_THRESHOLD = 0.4

_NOT_WORD = re.compile(r"[^\w\s']")


@dataclass(frozen=True)
class ParsedAction:
    action: str  # what the game gets
    kind: ActionKind
    similarity: float  # token F1 of the chosen action (1.0 for exact)


def normalize(text: str) -> str:
    """Lower case, punctuation (bullets, quotes, full stops) to spaces, whitespace collapsed."""
    return " ".join(_NOT_WORD.sub(" ", text.lower()).split())


def token_f1(reply: str, action: str) -> float:
    """F1 of the normalised word multisets of reply and action, in [0, 1]."""
    r, a = Counter(normalize(reply).split()), Counter(normalize(action).split())
    common = sum((r & a).values())
    if common == 0:
        return 0.0
    return 2 * common / (sum(r.values()) + sum(a.values()))


def parse_action(reply: str, valid_actions, threshold: float = MAP_THRESHOLD) -> ParsedAction:
    """The action sent for `reply` given the valid actions (module docstring: the rule)."""
    said = normalize(reply)
    for action in valid_actions:
        if normalize(action) == said:
            return ParsedAction(action, "exact", 1.0)
    best = None
    for action in sorted(valid_actions):  # strict > below: ties go to the first
        ratio = difflib.SequenceMatcher(None, said, normalize(action)).ratio()
        key = (token_f1(reply, action), ratio)
        if best is None or key > best[0]:
            best = (key, action)
    if best is not None and best[0][0] >= threshold:
        return ParsedAction(best[1], "mapped", best[0][0])
    return ParsedAction(reply.strip(), "invalid", 0.0 if best is None else best[0][0])
