"""Scorers for the evaluation tool: pure functions, standard library only at import time.

* `extract_number` / `math_exact_match`: the final number of a math response against a
  reference (the rule of `precompute.default_data.extract_answer`, extended to the usual
  answer markers and number spellings).
* `keyword_match`: free-text answers scored by the expected keywords they contain.
* `wilson_interval` / `bootstrap_interval`: confidence intervals of an accuracy (binary
  scores) or of a mean (any scores).
* `extract_code`: the program of a HumanEval-style response (runs in tools/eval/code_runner.py).
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Sequence
from fractions import Fraction

# A number as models write it: "-7", "$42", "1,234" (thousands groups only, so "1,2,3" is
# three numbers), "42.0", ".5", "3/4". No digit or letter just before it: "x2" is no number,
# and in "5-3" the "-" is an operator, not a sign.
NUMBER = re.compile(
    r"(?<!\w)(?P<sign>[-\u2212]?)(?:\$\s?)?"
    r"(?P<num>(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.\d+)?|\.\d+)"
    r"(?:\s*/\s*(?P<den>[1-9]\d*))?"
)
# Where a model states its answer. What may stand between the marker and the number:
# spaces, punctuation and markup ("The answer is: **$42**", "#### 42", "\boxed{42}").
MARKER = re.compile(
    r"(?:answer\s+is|answer\s*:|####|\\boxed\s*\{)(?:[^\w\n]|\\boxed|\\text|\\mathbf)*?"
    + NUMBER.pattern.removeprefix(r"(?<!\w)"),
    flags=re.IGNORECASE,
)
FRAC = re.compile(r"\\d?frac\s*\{\s*(-?\d+)\s*\}\s*\{\s*(\d+)\s*\}")


def _value(m: re.Match) -> Fraction:
    """The exact value of a NUMBER / MARKER match."""
    v = Fraction(m["num"].replace(",", ""))
    if m["den"]:
        v /= int(m["den"])
    return -v if m["sign"] else v


def _canonical(v: Fraction) -> str:
    """ "42" for 42 and 42.0, "0.5" for 1/2 and .50, "1/3" where no finite decimal exists."""
    if v.denominator == 1:
        return str(v.numerator)
    d = v.denominator
    for f in (2, 5):
        while d % f == 0:
            d //= f
    if d != 1:
        return f"{v.numerator}/{v.denominator}"
    k = 1  # decimal places: exact, no float rounding
    while (v * 10**k).denominator != 1:
        k += 1
    digits = str(abs(v.numerator * 10**k // v.denominator)).rjust(k + 1, "0")
    return ("-" if v < 0 else "") + digits[:-k] + "." + digits[-k:]


def _find(text: str) -> Fraction | None:
    text = FRAC.sub(r"\1/\2", text)  # \frac{3}{4} -> 3/4
    m = MARKER.search(text)  # the first: a small model may go on to invent more questions
    if m:
        return _value(m)
    numbers = list(NUMBER.finditer(text))
    return _value(numbers[-1]) if numbers else None


def extract_number(text: str) -> str | None:
    """The final numeric answer of a math response, normalised; None if it has no number.

    The number after the first answer marker ("answer is", "Answer:", "####", "\\boxed{")
    wins; without one, the last number of the text. "$1,234.50" -> "1234.5", "42.0" -> "42",
    "-7" -> "-7", "3/4" and "\\frac{3}{4}" -> "0.75", "1/3" -> "1/3".
    """
    v = _find(text or "")
    return None if v is None else _canonical(v)


def _reference(ref: str | int | float) -> Fraction | None:
    if isinstance(ref, bool):
        return None
    if isinstance(ref, int):
        return Fraction(ref)
    if isinstance(ref, float):
        return Fraction(ref) if math.isfinite(ref) else None
    return _find(str(ref))  # "42", "$1,234", "#### 42"


def math_exact_match(response: str, reference: str | int | float, rel_tol: float = 1e-6) -> float:
    """1.0 if the response's final number equals the reference (within rel_tol), else 0.0.

    The reference may be a number or a string in any form `extract_number` reads; an
    unreadable reference scores 0.0. Exact fractions compare exactly ("3/4" == 0.75).
    """
    got, want = _find(response or ""), _reference(reference)
    if got is None or want is None:
        return 0.0
    if got == want:
        return 1.0
    return float(math.isclose(float(got), float(want), rel_tol=rel_tol, abs_tol=1e-12))


def keyword_match(response: str, keywords: str | Iterable[str], mode: str = "all") -> float:
    """Score a free-text response by the expected keywords it contains.

    Case-insensitive whole-word matching ("cat" is not found in "concatenate"; a keyword of
    several words matches across any whitespace). mode: "all" -> 1.0 if every keyword is
    present, "any" -> 1.0 if one is, "fraction" -> the share present. A single string is one
    keyword. Raises ValueError for an empty keyword list (a data error, not a score).
    """
    kws = [keywords] if isinstance(keywords, str) else list(keywords)
    kws = [k.strip() for k in kws if k and k.strip()]
    if not kws:
        raise ValueError("keyword_match needs at least one non-empty keyword")
    if mode not in ("all", "any", "fraction"):
        raise ValueError(f"mode must be 'all', 'any' or 'fraction', not {mode!r}")
    text = response or ""
    # (?<!\w)/(?!\w) rather than \b: keywords may begin or end with non-word characters.
    hits = [
        re.search(r"(?<!\w)" + r"\s+".join(map(re.escape, k.split())) + r"(?!\w)", text, re.I)
        is not None
        for k in kws
    ]
    if mode == "all":
        return float(all(hits))
    if mode == "any":
        return float(any(hits))
    return sum(hits) / len(hits)


def wilson_interval(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval of a proportion (z=1.96: 95%). n == 0 gives (0.0, 1.0).

    Unlike the normal approximation it stays inside [0, 1] and is not empty at 0/n or n/n.
    """
    if n < 0 or not 0 <= successes <= n:
        raise ValueError(f"need 0 <= successes <= n, got {successes}/{n}")
    if n == 0:
        return 0.0, 1.0  # no evidence: every proportion is possible
    p = successes / n
    denom = 1 + z * z / n
    center = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    lo = 0.0 if successes == 0 else max(0.0, center - half)
    hi = 1.0 if successes == n else min(1.0, center + half)
    return lo, hi


def bootstrap_means(values: Sequence[float], n_boot: int = 2000, seed: int = 0):
    """The means of `n_boot` resamples (with replacement) of `values`: float64 array
    [n_boot], deterministic given `seed` (the draws of one rng.integers stream)."""
    import numpy as np  # the module keeps to the standard library at import time (docstring)

    x = np.asarray(values, dtype=np.float64).ravel()
    rng = np.random.default_rng(seed)
    means = np.empty(n_boot)
    step = max(1, 2**20 // max(x.size, 1))  # resample in chunks: n_boot * n indices at once is big
    for i in range(0, n_boot, step):
        rows = min(step, n_boot - i)
        means[i : i + rows] = x[rng.integers(0, x.size, size=(rows, x.size))].mean(axis=1)
    return means


def bootstrap_interval(
    values: Sequence[float], n_boot: int = 2000, seed: int = 0, level: float = 0.95
) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of `values`, deterministic given `seed`.

    For scores that are not 0/1 (use `wilson_interval` for those). No values give
    (nan, nan): unlike a proportion, the scores have no known range to fall back on.
    """
    import numpy as np

    if np.asarray(values).size == 0:
        return math.nan, math.nan
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    tail = (1 - level) / 2
    lo, hi = np.quantile(bootstrap_means(values, n_boot, seed), [tail, 1 - tail])
    return float(lo), float(hi)


FENCE = re.compile(r"```([^\n`]*)\n(.*?)(?:```|\Z)", re.DOTALL)  # (language, code)
IMPORT = re.compile(r"^(?:import|from)\s.+$", re.MULTILINE)


def extract_code(response: str, prompt: str) -> str:
    """The program a HumanEval-style response stands for.

    * A fenced block (the first ```python / ```py / ```python3 one, else the first bare
      ``` one; an unclosed fence runs to the end) that defines a function at top level is a
      whole program: it is returned after the prompt's import lines it lacks (models often
      leave out "from typing import List").
    * A fenced block without a top-level def is a function body: prompt + block.
    * No such fence: the response continues the prompt (a completion model): prompt +
      response.
    """
    blocks = [(lang.strip().lower(), code) for lang, code in FENCE.findall(response)]
    code = next((c for lang, c in blocks if lang in ("python", "py", "python3")), None)
    if code is None:
        code = next((c for lang, c in blocks if not lang), None)
    if code is None:
        return prompt + response
    if not re.search(r"^(?:async\s+)?def\s", code, re.MULTILINE):
        return prompt + code
    missing = [line for line in IMPORT.findall(prompt) if line not in code]
    return "\n".join(missing + [code]) if missing else code
