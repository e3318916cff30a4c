"""Generated mathematics: every answer checked by an independent computation."""

from __future__ import annotations

import math
import re
from fractions import Fraction as F

import pytest

from moe.data.sources import math_gen

sympy = pytest.importorskip("sympy")

NUM = r"(-?\d+(?:\.\d+)?(?:/\d+)?)"


def _ev(expr: str, **env) -> F:
    """Evaluate a Python-syntax expression exactly (integer literals become Fractions)."""
    return eval(re.sub(r"(?<![\w.])(\d+)", r"F(\1)", expr), {"F": F}, {k: F(v) for k, v in env.items()})


def _binary(q):
    for pat, fn in [
        (rf"^(?:What is|Calculate) {NUM} \+ {NUM}[.?]$", lambda a, b: a + b),
        (rf"^(?:Add|Sum) {NUM} and {NUM}\.$", lambda a, b: a + b),
        (rf"^(?:What is|Calculate) {NUM} - {NUM}[.?]$", lambda a, b: a - b),
        (rf"^What is {NUM} minus {NUM}\?$", lambda a, b: a - b),
        (rf"^Subtract {NUM} from {NUM}\.$", lambda a, b: b - a),
        (rf"^(?:What is {NUM} times {NUM}\?|Multiply {NUM} and {NUM}\.)$", None),
    ]:
        m = re.match(pat, q)
        if m and fn:
            return fn(F(m.group(1)), F(m.group(2)))
    return None


def check(module: str, q: str, a: str) -> None:
    if module in ("arithmetic__add_or_sub", "arithmetic__add_sub_fractions"):
        assert _binary(q) == F(a)
    elif module == "arithmetic__mul":
        m = re.match(
            rf"^(?:What is {NUM} times|Multiply {NUM} and|Calculate {NUM}\*|What is the product of {NUM} and)"
            rf" ?{NUM}[.?]$",
            q,
        )
        nums = [g for g in m.groups() if g is not None]
        assert F(nums[0]) * F(nums[1]) == F(a)
    elif module == "arithmetic__div":
        m = re.match(
            rf"^(?:Divide {NUM} by|What is {NUM} divided by|Calculate {NUM}/|{NUM} divided by) ?{NUM}[.?]?$", q
        )
        nums = [g for g in m.groups() if g is not None]
        assert F(nums[0]) / F(nums[1]) == F(a)
    elif module == "arithmetic__mixed":
        m = re.match(r"^(?:Evaluate|Calculate|What is the value of|What is) (.+)[.?]$", q)
        assert _ev(m.group(1)) == F(a)
    elif module == "algebra__linear_1d":
        m = re.match(r"^Solve (.+) = (.+?)(?: for (\w))?\.$", q)
        var = m.group(3) or re.search(r"[a-z]", m.group(1) + m.group(2)).group(0)
        lhs, rhs = m.group(1), m.group(2)
        assert _ev(lhs, **{var: a}) == _ev(rhs, **{var: a})
        assert _ev(lhs, **{var: int(a) + 1}) != _ev(rhs, **{var: int(a) + 1})  # unique solution
    elif module == "algebra__linear_2d":
        m = re.match(r"^Solve (.+) = (-?\d+), (.+) = (-?\d+) for (\w)\.$", q)
        eqs = [
            sympy.Eq(sympy.sympify(m.group(1)), int(m.group(2))),
            sympy.Eq(sympy.sympify(m.group(3)), int(m.group(4))),
        ]
        sol = sympy.solve(eqs, dict=True)
        assert len(sol) == 1 and sol[0][sympy.Symbol(m.group(5))] == int(a)
    elif module == "calculus__differentiate":
        m = re.search(
            r"(?:the (second |third )?derivative of |Differentiate )(.+?)(?: with respect to (\w)| wrt (\w))?[.?]$", q
        )
        order = {None: 1, "second ": 2, "third ": 3}[m.group(1)]
        body = m.group(2)
        fm = re.match(r"^(\w)\((\w)\)$", body)
        if fm:  # "Let f(x) = p. What is the derivative of f(x)?"
            body, var = re.match(r"^Let \w\(\w\) = (.+?)\. What", q).group(1), fm.group(2)
        else:
            var = m.group(3) or m.group(4) or re.search(r"[a-z]", body).group(0)
        x = sympy.Symbol(var)
        assert sympy.expand(sympy.diff(sympy.sympify(body), x, order) - sympy.sympify(a)) == 0
    elif module == "polynomials__evaluate":
        m = re.match(r"^Let (\w)\((\w)\) = (.+)\. (?:What is|Calculate|Give) \1\((-?\d+)\)[.?]$", q)
        assert _ev(m.group(3), **{m.group(2): int(m.group(4))}) == F(a)
    elif module == "numbers__gcd":
        x, y = map(int, re.findall(r"\d+", q))
        assert math.gcd(x, y) == int(a)
    elif module == "numbers__lcm":
        x, y = map(int, re.findall(r"\d+", q))
        assert math.lcm(x, y) == int(a)
    elif module == "numbers__remainder":
        x, y = map(int, re.findall(r"\d+", q))
        assert x % y == int(a)
    elif module == "numbers__is_prime":
        n = int(re.search(r"\d+", q).group(0))
        assert str(sympy.isprime(n)) == a
    elif module == "numbers__list_prime_factors":
        n = int(re.search(r"\d+", q).group(0))
        assert a == ", ".join(map(str, sympy.primefactors(n)))
    elif module == "numbers__place_value":
        m = re.match(r"^What is the (.+) digit of (\d+)\?$", q)
        k = ["units", "tens", "hundreds", "thousands", "ten thousands", "hundred thousands"].index(m.group(1))
        assert m.group(2)[::-1][k] == a
    elif module == "numbers__round_number":
        m = re.match(r"^Round (-?\d+) to the nearest (.+)\.$", q)
        step = {"ten": 10, "one hundred": 100, "one thousand": 1000, "ten thousand": 10000}[m.group(2)]
        n, r = int(m.group(1)), int(a)
        assert r % step == 0 and 2 * abs(n - r) < step
    elif module == "numbers__base_conversion":
        m = re.match(r"^What is (-?\d+) \(base 10\) in base (\d+)\?$", q)
        if m:
            assert int(a, int(m.group(2))) == int(m.group(1))
        else:
            m = re.match(r"^Convert (-?[0-9a-f]+) \(base (\d+)\) to base 10\.$", q)
            assert int(m.group(1), int(m.group(2))) == int(a)
    elif module == "comparison__sort":
        m = re.match(r"^(?:Sort|Put) (.+) in (ascending|descending|increasing) order\.$", q)
        vals = [int(v) for v in m.group(1).split(", ")]
        assert [int(v) for v in a.split(", ")] == sorted(vals, reverse=m.group(2) == "descending")
    elif module == "comparison__pair":
        x, y = map(int, re.findall(r"-?\d+", q))
        expected = {"bigger": max(x, y), "smaller": min(x, y)}
        word = re.search(r"bigger|smaller|less than", q).group(0)
        assert a == (str(x < y) if word == "less than" else str(expected[word]))
    else:
        raise AssertionError(f"no check for module {module}")


def test_every_module_gives_correct_answers():
    n_modules = len(math_gen.MODULES)
    for index in range(3 * n_modules):  # three problem sets per module
        module, problems = math_gen.problem_set(seed=7, index=index, n_problems=25)
        for q, a in problems:
            assert "\n" not in q and "\n" not in a
            check(module, q, a)


def test_generation_is_deterministic_and_seeded():
    a = list(math_gen.generate_documents(0, max_chars=20_000, problems_per_doc=10))
    b = list(math_gen.generate_documents(0, max_chars=20_000, problems_per_doc=10))
    c = list(math_gen.generate_documents(1, max_chars=20_000, problems_per_doc=10))
    assert a == b and a != c
    assert sum(len(t) for _, t in a) <= 20_000
    assert len({src.split("/")[1] for src, _ in a}) > 10  # problem sets of many modules
