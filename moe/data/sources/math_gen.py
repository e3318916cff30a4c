"""Procedural school mathematics in the style of DeepMind's Mathematics dataset.

The Pile's "DM Mathematics" subset is text generated this way: one question per line followed by
its answer, grouped by module (arithmetic, algebra, calculus, numbers, polynomials, comparison).
We generate the same kinds of problems with exact arithmetic (`fractions.Fraction`, integers), so
every answer is correct, and expressions use Python syntax (`3*x**2`), as DM Mathematics does.

A document is a problem set of one module: `problem_set(seed, index, n)` depends only on its
arguments, so any document can be regenerated on its own.
"""

from __future__ import annotations

import math
import operator
import random
from collections.abc import Callable, Iterator
from fractions import Fraction

Problem = tuple[str, str]  # (question, answer)

_VARS = "abcdfghjklmnpqrstuvwxyz"  # DM avoids e and i (constants) and o (looks like 0)
_PLACE = ["units", "tens", "hundreds", "thousands", "ten thousands", "hundred thousands"]


# ---- formatting -------------------------------------------------------------------------------
def _num(q: Fraction | int) -> str:
    """An exact number as DM writes it: integers plainly, other rationals as a/b."""
    q = Fraction(q)
    return str(q.numerator) if q.denominator == 1 else f"{q.numerator}/{q.denominator}"


def _dec(units: int, places: int) -> str:
    """`units / 10**places` written as a terminating decimal without trailing zeros."""
    sign = "-" if units < 0 else ""
    whole, frac = divmod(abs(units), 10**places)
    frac_s = f"{frac:0{places}d}".rstrip("0") if places else ""
    return f"{sign}{whole}" + (f".{frac_s}" if frac_s else "")


def _poly(coeffs: dict[int, int], var: str) -> str:
    """Polynomial {degree: coefficient} in descending degree, e.g. `-3*x**2 + x - 7`."""
    terms = [(k, c) for k, c in sorted(coeffs.items(), reverse=True) if c != 0]
    if not terms:
        return "0"
    out = []
    for i, (k, c) in enumerate(terms):
        mag = abs(c)
        body = var if k == 1 else f"{var}**{k}" if k > 1 else ""
        term = str(mag) if not body else (body if mag == 1 else f"{mag}*{body}")
        if i == 0:
            out.append(("-" if c < 0 else "") + term)
        else:
            out.append(("- " if c < 0 else "+ ") + term)
    return " ".join(out)


def _linear(a: int, var: str, b: int) -> str:
    """`a*var + b` tidily (no 1*, no + -)."""
    return _poly({1: a, 0: b}, var)


def _nonzero(rng: random.Random, lo: int, hi: int) -> int:
    while True:
        v = rng.randint(lo, hi)
        if v != 0:
            return v


def _int(rng: random.Random) -> int:
    """A signed integer whose size varies over orders of magnitude, as in DM arithmetic."""
    return rng.choice([-1, 1]) * rng.randint(0, 10 ** rng.randint(1, 4))


def _is_prime(n: int) -> bool:
    if n < 2:
        return False
    return all(n % p for p in range(2, math.isqrt(n) + 1))


def _prime_factors(n: int) -> list[int]:
    out, p = [], 2
    while p * p <= n:
        if n % p == 0:
            out.append(p)
            while n % p == 0:
                n //= p
        p += 1
    if n > 1:
        out.append(n)
    return out


# ---- modules: each returns one (question, answer) ---------------------------------------------
def arithmetic_add_or_sub(rng: random.Random) -> Problem:
    if rng.random() < 0.3:  # decimals, exact because both are scaled integers
        places = rng.randint(1, 3)
        a, b = (
            rng.randint(-(10 ** (places + 2)), 10 ** (places + 2)),
            rng.randint(-(10 ** (places + 2)), 10 ** (places + 2)),
        )
        A, B = _dec(a, places), _dec(b, places)
        if rng.random() < 0.5:
            return rng.choice([f"What is {A} + {B}?", f"Add {A} and {B}.", f"Sum {A} and {B}."]), _dec(a + b, places)
        return rng.choice([f"What is {A} - {B}?", f"Subtract {B} from {A}.", f"Calculate {A} - {B}."]), _dec(
            a - b, places
        )
    a, b = _int(rng), _int(rng)
    if rng.random() < 0.5:
        return rng.choice(
            [f"What is {a} + {b}?", f"Add {a} and {b}.", f"Calculate {a} + {b}.", f"Sum {a} and {b}."]
        ), str(a + b)
    return rng.choice(
        [f"What is {a} - {b}?", f"Subtract {b} from {a}.", f"Calculate {a} - {b}.", f"What is {a} minus {b}?"]
    ), str(a - b)


def arithmetic_mul(rng: random.Random) -> Problem:
    a, b = rng.randint(-999, 999), rng.randint(-99, 99)
    return rng.choice(
        [
            f"What is {a} times {b}?",
            f"Multiply {a} and {b}.",
            f"Calculate {a}*{b}.",
            f"What is the product of {a} and {b}?",
        ]
    ), str(a * b)


def arithmetic_div(rng: random.Random) -> Problem:
    b = _nonzero(rng, -60, 60)
    q = rng.randint(-400, 400)
    a = q * b
    return rng.choice(
        [f"Divide {a} by {b}.", f"What is {a} divided by {b}?", f"Calculate {a}/{b}.", f"{a} divided by {b}"]
    ), str(q)


_OPS: dict[str, Callable[[Fraction, Fraction], Fraction]] = {
    "+": operator.add,
    "-": operator.sub,
    "*": operator.mul,
    "/": operator.truediv,
}


def _expr(rng: random.Random, depth: int) -> tuple[str, Fraction, bool]:
    """A random arithmetic expression (Python syntax), its exact value, and whether it is compound
    (so a parent puts it in parentheses)."""
    if depth == 0 or rng.random() < 0.3:
        v = rng.randint(-20, 20)
        return (f"({v})" if v < 0 else str(v)), Fraction(v), False
    ls, lv, lc = _expr(rng, depth - 1)
    rs, rv, rc = _expr(rng, depth - 1)
    op = rng.choice("+-*/")
    if op == "/" and rv == 0:
        op = "*"
    val = _OPS[op](lv, rv)
    ls, rs = (f"({ls})" if lc else ls), (f"({rs})" if rc else rs)
    return f"{ls} {op} {rs}", val, True


def arithmetic_mixed(rng: random.Random) -> Problem:
    s, v, compound = _expr(rng, rng.randint(2, 3))
    while not compound:
        s, v, compound = _expr(rng, rng.randint(2, 3))
    return rng.choice([f"Evaluate {s}.", f"What is the value of {s}?", f"Calculate {s}.", f"What is {s}?"]), _num(v)


def fractions_add_or_sub(rng: random.Random) -> Problem:
    a = Fraction(rng.randint(-12, 12), rng.randint(1, 12))
    b = Fraction(rng.randint(-12, 12), rng.randint(1, 12))
    if rng.random() < 0.5:
        return f"What is {_num(a)} + {_num(b)}?", _num(a + b)
    return f"Calculate {_num(a)} - {_num(b)}.", _num(a - b)


def algebra_linear_1d(rng: random.Random) -> Problem:
    x = rng.choice(_VARS)
    sol = rng.randint(-20, 20)
    a = _nonzero(rng, -15, 15)
    c = rng.randint(-15, 15)
    while c == a:
        c = rng.randint(-15, 15)
    b = rng.randint(-60, 60)
    d = a * sol + b - c * sol  # a*x + b = c*x + d holds at x = sol
    lhs, rhs = _linear(a, x, b), _linear(c, x, d)
    if rng.random() < 0.3:  # DM's "0 = ..." form
        lhs, rhs = "0", _linear(a - c, x, b - d)
    return rng.choice([f"Solve {lhs} = {rhs} for {x}.", f"Solve {lhs} = {rhs}."]), str(sol)


def algebra_linear_2d(rng: random.Random) -> Problem:
    x, y = rng.sample(_VARS, 2)
    sx, sy = rng.randint(-10, 10), rng.randint(-10, 10)
    while True:
        a, b, c, d = (_nonzero(rng, -9, 9) for _ in range(4))
        if a * d - b * c != 0:  # a unique solution
            break
    e, f = a * sx + b * sy, c * sx + d * sy
    eq1 = _poly({1: a}, x) + (" - " if b < 0 else " + ") + _poly({1: abs(b)}, y) + f" = {e}"
    eq2 = _poly({1: c}, x) + (" - " if d < 0 else " + ") + _poly({1: abs(d)}, y) + f" = {f}"
    target, value = (x, sx) if rng.random() < 0.5 else (y, sy)
    return f"Solve {eq1}, {eq2} for {target}.", str(value)


def calculus_differentiate(rng: random.Random) -> Problem:
    v = rng.choice(_VARS)
    deg = rng.randint(2, 5)
    coeffs = {k: rng.randint(-12, 12) for k in range(deg + 1)}
    coeffs[deg] = _nonzero(rng, -12, 12)
    order = rng.choice([1, 1, 1, 2, 2, 3])
    deriv = dict(coeffs)
    for _ in range(order):
        deriv = {k - 1: c * k for k, c in deriv.items() if k > 0}
    nth = {1: "", 2: "second ", 3: "third "}[order]
    f = rng.choice("fghjkmnpqrstuvwz")
    p = _poly(coeffs, v)
    q = rng.choice(
        [
            f"Let {f}({v}) = {p}. What is the {nth}derivative of {f}({v})?",
            f"What is the {nth}derivative of {p} wrt {v}?",
            f"Find the {nth}derivative of {p} with respect to {v}.",
            f"Differentiate {p} with respect to {v}." if order == 1 else f"Find the {nth}derivative of {p}.",
        ]
    )
    return q, _poly(deriv, v)


def polynomials_evaluate(rng: random.Random) -> Problem:
    v = rng.choice(_VARS)
    f = rng.choice("fghjkmnpqrstuvwz")
    deg = rng.randint(1, 3)
    coeffs = {k: rng.randint(-9, 9) for k in range(deg + 1)}
    coeffs[deg] = _nonzero(rng, -9, 9)
    at = rng.randint(-8, 8)
    value = sum(c * at**k for k, c in coeffs.items())
    return rng.choice(
        [
            f"Let {f}({v}) = {_poly(coeffs, v)}. What is {f}({at})?",
            f"Let {f}({v}) = {_poly(coeffs, v)}. Calculate {f}({at}).",
            f"Let {f}({v}) = {_poly(coeffs, v)}. Give {f}({at}).",
        ]
    ), str(value)


def numbers_gcd(rng: random.Random) -> Problem:
    g = rng.randint(1, 60)
    a, b = g * rng.randint(1, 80), g * rng.randint(1, 80)
    return rng.choice(
        [
            f"What is the greatest common divisor of {a} and {b}?",
            f"Calculate the highest common factor of {a} and {b}.",
            f"What is the greatest common factor of {a} and {b}?",
        ]
    ), str(math.gcd(a, b))


def numbers_lcm(rng: random.Random) -> Problem:
    a, b = rng.randint(2, 150), rng.randint(2, 150)
    return rng.choice(
        [
            f"What is the lowest common multiple of {a} and {b}?",
            f"Calculate the least common multiple of {a} and {b}.",
            f"What is the smallest common multiple of {a} and {b}?",
        ]
    ), str(a * b // math.gcd(a, b))


def numbers_remainder(rng: random.Random) -> Problem:
    a, b = rng.randint(10, 100000), rng.randint(2, 500)
    return rng.choice(
        [f"What is the remainder when {a} is divided by {b}?", f"Calculate the remainder when {a} is divided by {b}."]
    ), str(a % b)


def numbers_is_prime(rng: random.Random) -> Problem:
    want_prime = rng.random() < 0.5
    while True:
        n = rng.randint(2, 200000)
        if n % 2 and _is_prime(n) == want_prime:
            break
    return rng.choice([f"Is {n} prime?", f"Is {n} a prime number?"]), str(_is_prime(n))


def numbers_prime_factors(rng: random.Random) -> Problem:
    n = rng.randint(4, 50000)
    return rng.choice([f"What are the prime factors of {n}?", f"List the prime factors of {n}."]), ", ".join(
        map(str, _prime_factors(n))
    )


def numbers_place_value(rng: random.Random) -> Problem:
    n = rng.randint(100, 9_999_999)
    k = rng.randint(0, min(len(str(n)) - 1, len(_PLACE) - 1))
    return f"What is the {_PLACE[k]} digit of {n}?", str(n // 10**k % 10)


def numbers_round(rng: random.Random) -> Problem:
    k = rng.randint(1, 4)
    while True:
        n = rng.randint(-(10**7), 10**7)
        if 2 * (n % 10**k) != 10**k:  # no ties, so the answer does not depend on a tie rule
            break
    nearest = {1: "ten", 2: "one hundred", 3: "one thousand", 4: "ten thousand"}[k]
    return f"Round {n} to the nearest {nearest}.", str(round(n / 10**k) * 10**k)


def numbers_base_conversion(rng: random.Random) -> Problem:
    base = rng.choice([2, 3, 4, 5, 6, 7, 8, 9, 12, 16])
    n = rng.randint(-5000, 5000)
    digits = "0123456789abcdef"

    def to_base(v: int) -> str:
        if v == 0:
            return "0"
        s, m = "", abs(v)
        while m:
            m, r = divmod(m, base)
            s = digits[r] + s
        return ("-" if v < 0 else "") + s

    if rng.random() < 0.5:
        return f"What is {n} (base 10) in base {base}?", to_base(n)
    return f"Convert {to_base(n)} (base {base}) to base 10.", str(n)


def comparison_sort(rng: random.Random) -> Problem:
    vals = rng.sample(range(-500, 500), rng.randint(3, 6))
    desc = rng.random() < 0.5
    listed = ", ".join(map(str, vals))
    q = (
        f"Sort {listed} in descending order."
        if desc
        else rng.choice([f"Sort {listed} in ascending order.", f"Put {listed} in increasing order."])
    )
    return q, ", ".join(map(str, sorted(vals, reverse=desc)))


def comparison_pair(rng: random.Random) -> Problem:
    a, b = rng.sample(range(-10000, 10000), 2)
    form = rng.randrange(3)
    if form == 0:
        return f"Which is bigger: {a} or {b}?", str(max(a, b))
    if form == 1:
        return f"Is {a} less than {b}?", str(a < b)
    return f"Which is smaller: {a} or {b}?", str(min(a, b))


MODULES: dict[str, Callable[[random.Random], Problem]] = {
    "algebra__linear_1d": algebra_linear_1d,
    "algebra__linear_2d": algebra_linear_2d,
    "arithmetic__add_or_sub": arithmetic_add_or_sub,
    "arithmetic__div": arithmetic_div,
    "arithmetic__mixed": arithmetic_mixed,
    "arithmetic__mul": arithmetic_mul,
    "arithmetic__add_sub_fractions": fractions_add_or_sub,
    "calculus__differentiate": calculus_differentiate,
    "comparison__pair": comparison_pair,
    "comparison__sort": comparison_sort,
    "numbers__base_conversion": numbers_base_conversion,
    "numbers__gcd": numbers_gcd,
    "numbers__is_prime": numbers_is_prime,
    "numbers__lcm": numbers_lcm,
    "numbers__list_prime_factors": numbers_prime_factors,
    "numbers__place_value": numbers_place_value,
    "numbers__remainder": numbers_remainder,
    "numbers__round_number": numbers_round,
    "polynomials__evaluate": polynomials_evaluate,
}
_MODULE_NAMES = sorted(MODULES)


def problem_set(seed: int, index: int, n_problems: int) -> tuple[str, list[Problem]]:
    """Problem set `index`: module `index mod #modules`, problems from a RNG seeded by (seed, index)."""
    module = _MODULE_NAMES[index % len(_MODULE_NAMES)]
    # A string seed is hashed with SHA-512 by `random`, stable across Python versions.
    rng = random.Random(f"moe-math:{seed}:{index}")
    return module, [MODULES[module](rng) for _ in range(n_problems)]


def format_problems(problems: list[Problem]) -> str:
    """One question line, one answer line, a blank line between pairs."""
    return "".join(f"{q}\n{a}\n\n" for q, a in problems)


def generate_documents(
    seed: int, *, max_chars: int | None, problems_per_doc: int, max_docs: int = 100_000
) -> Iterator[tuple[str, str]]:
    """Yield (source id, text) problem sets until `max_chars` characters (the last set is cut
    short at a whole problem so the total stays within the cap)."""
    total = 0
    for index in range(max_docs):
        module, problems = problem_set(seed, index, problems_per_doc)
        text = format_problems(problems)
        if max_chars is not None and total + len(text) > max_chars:
            keep: list[Problem] = []
            for qa in problems:
                if total + len(format_problems(keep + [qa])) > max_chars:
                    break
                keep.append(qa)
            if keep:
                yield f"math/{module}/{index:05d}", format_problems(keep)
            return
        total += len(text)
        yield f"math/{module}/{index:05d}", text
