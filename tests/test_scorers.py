"""tools/eval/scorers.py: answer extraction, exact match, keywords, intervals, code extraction."""

from __future__ import annotations

import math

import numpy as np
import pytest

from tools.eval.scorers import (
    bootstrap_interval,
    extract_code,
    extract_number,
    keyword_match,
    math_exact_match,
    wilson_interval,
)

# ---- extract_number / math_exact_match ---------------------------------------------------------


@pytest.mark.parametrize(
    "text, want",
    [
        ("The answer is 42.", "42"),
        ("$42", "42"),
        ("42.0", "42"),
        ("42.50", "42.5"),
        ("1,234", "1234"),
        ("It costs $1,234.50 in total.", "1234.5"),
        ("-7", "-7"),
        ("The answer is -7.", "-7"),
        ("The answer is \u22125", "-5"),  # a Unicode minus
        ("x = 42", "42"),
        ("**42**", "42"),
        ("She has 42 apples", "42"),
        ("First 3, then 5, so 8.", "8"),  # no marker: the last number
        ("The answer is 12. Question: what is 3 + 4? The answer is 7.", "12"),  # the first
        ("Answer: 9\nNext we add 10", "9"),
        ("The answer is: **$1,234**", "1234"),
        ("so #### 72", "72"),
        ("Thus $\\boxed{17}$ remains, 3 left", "17"),
        ("$\\boxed{\\frac{3}{4}}$", "0.75"),
        ("3/4", "0.75"),
        ("1/3", "1/3"),
        ("2 = 5 - 3", "3"),  # "-" between numbers is an operator, not a sign
        ("1,2,3", "3"),  # not a thousands grouping
        ("Answer: let us count. 2 + 2 = 4", "4"),  # a marker not followed by a number
    ],
)
def test_extract_number(text, want):
    assert extract_number(text) == want


@pytest.mark.parametrize("text", ["", "no number here", "the answer is unknown", None])
def test_extract_number_none(text):
    assert extract_number(text) is None


@pytest.mark.parametrize(
    "response, reference",
    [
        ("The answer is 42.", 42),
        ("The answer is 42.", "42"),
        ("$42", 42.0),
        ("42.0", "42"),
        ("1,234", 1234),
        ("1234", "1,234"),
        ("-7", -7),
        ("The answer is 0.1", 0.1),
        ("The answer is 0.3333333", "1/3"),  # within the relative tolerance
        ("3/4", 0.75),
        ("#### 18", "#### 18"),  # a GSM8K-style reference
    ],
)
def test_math_exact_match_right(response, reference):
    assert math_exact_match(response, reference) == 1.0


@pytest.mark.parametrize(
    "response, reference",
    [
        ("The answer is 41.", 42),
        ("The answer is 7. Also 42.", 42),  # the stated answer counts, not a later number
        ("-7", 7),
        ("no number", 42),
        ("", 0),
        ("The answer is 42.01", 42),
        ("42", "not a number"),
        ("42", float("nan")),
        ("1", True),  # a bool is not a numeric reference
    ],
)
def test_math_exact_match_wrong(response, reference):
    assert math_exact_match(response, reference) == 0.0


# ---- keyword_match -----------------------------------------------------------------------------


def test_keyword_match_modes():
    text = "Paris is the capital of France."
    assert keyword_match(text, ["paris", "FRANCE"]) == 1.0
    assert keyword_match(text, ["paris", "berlin"]) == 0.0
    assert keyword_match(text, ["paris", "berlin"], mode="any") == 1.0
    assert keyword_match(text, ["rome", "berlin"], mode="any") == 0.0
    assert keyword_match(text, ["paris", "berlin", "capital", "rome"], mode="fraction") == 0.5
    assert keyword_match(text, "capital of  france") == 1.0  # one keyword, any whitespace


def test_keyword_match_word_boundaries():
    assert keyword_match("concatenate", ["cat"]) == 0.0
    assert keyword_match("the cat.", ["cat"]) == 1.0
    assert keyword_match("I like C++ a lot", ["c++"]) == 1.0  # non-word edges
    assert keyword_match("I like C a lot", ["c++"]) == 0.0
    assert keyword_match("cats", ["cat"]) == 0.0


def test_keyword_match_bad_arguments():
    with pytest.raises(ValueError):
        keyword_match("text", [])
    with pytest.raises(ValueError):
        keyword_match("text", ["  "])
    with pytest.raises(ValueError):
        keyword_match("text", ["text"], mode="most")


# ---- intervals ---------------------------------------------------------------------------------


def naive_wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """The textbook formula, written out separately."""
    p = k / n
    a = p + z**2 / (2 * n)
    b = z * math.sqrt(p * (1 - p) / n + z**2 / (4 * n**2))
    c = 1 + z**2 / n
    return max(0.0, (a - b) / c), min(1.0, (a + b) / c)


@pytest.mark.parametrize("k, n", [(0, 100), (50, 100), (100, 100), (1, 3), (7, 10), (163, 164)])
def test_wilson_matches_formula(k, n):
    assert wilson_interval(k, n) == pytest.approx(naive_wilson(k, n), abs=1e-12)


def test_wilson_known_values():
    assert wilson_interval(0, 100) == pytest.approx((0.0, 0.036995), abs=1e-6)
    assert wilson_interval(50, 100) == pytest.approx((0.403830, 0.596170), abs=1e-6)
    assert wilson_interval(100, 100) == pytest.approx((0.963005, 1.0), abs=1e-6)
    lo, hi = wilson_interval(0, 100)
    assert lo == 0.0 and wilson_interval(100, 100)[1] == 1.0  # exactly, no rounding dust
    assert wilson_interval(0, 0) == (0.0, 1.0)
    narrow, wide = wilson_interval(50, 100, z=1.0), wilson_interval(50, 100, z=2.58)
    assert wide[0] < narrow[0] < 0.5 < narrow[1] < wide[1]
    with pytest.raises(ValueError):
        wilson_interval(5, 3)


def test_bootstrap_interval():
    rng = np.random.default_rng(1)
    values = rng.uniform(0, 1, size=200)
    lo, hi = bootstrap_interval(values, seed=3)
    assert (lo, hi) == bootstrap_interval(list(values), seed=3)  # deterministic
    assert (lo, hi) != bootstrap_interval(values, seed=4)
    assert lo < values.mean() < hi
    # About the normal-theory interval of a mean (1.96 standard errors each side).
    se = values.std(ddof=1) / math.sqrt(len(values))
    assert hi - lo == pytest.approx(2 * 1.96 * se, rel=0.15)
    lo90, hi90 = bootstrap_interval(values, seed=3, level=0.9)
    assert lo < lo90 < hi90 < hi


def test_bootstrap_edge_cases():
    assert all(math.isnan(x) for x in bootstrap_interval([]))
    assert bootstrap_interval([0.7]) == (0.7, 0.7)
    assert bootstrap_interval([2.0] * 5) == (2.0, 2.0)
    # Large inputs are resampled in chunks; the result is still a sane interval.
    big = np.arange(5000) % 7
    lo, hi = bootstrap_interval(big, n_boot=300)
    assert lo < big.mean() < hi


# ---- extract_code ------------------------------------------------------------------------------

PROMPT = 'from typing import List\n\n\ndef add(xs: List[int]) -> int:\n    """Sum."""\n'


def test_extract_code_continuation():
    body = "    return sum(xs)\n"
    assert extract_code(body, PROMPT) == PROMPT + body


def test_extract_code_fenced_program():
    code = "def add(xs: List[int]) -> int:\n    return sum(xs)\n"
    response = f"Here you go:\n```python\n{code}```\nIt adds the numbers. ```py\nx = 1\n```"
    program = extract_code(response, PROMPT)
    assert program == "from typing import List\n" + code  # the missing import comes along
    namespace: dict = {}
    exec(program, namespace)
    assert namespace["add"]([1, 2, 3]) == 6


def test_extract_code_fence_variants():
    full = "from typing import List\ndef add(xs):\n    return sum(xs)\n"
    assert extract_code(f"```python\n{full}```", PROMPT) == full  # nothing to add
    body = "    return sum(xs)\n"
    assert extract_code(f"```python\n{body}```", PROMPT) == PROMPT + body
    assert extract_code(f"```\n{full}```", PROMPT) == full  # a bare fence
    assert extract_code(f"```python\n{full}", PROMPT) == full  # cut off before the close
    # A python block is preferred over an earlier block in another language.
    response = f"```text\nnot code\n```\n```python\n{full}```"
    assert extract_code(response, PROMPT) == full
