"""A small, safe evaluator for school arithmetic and algebra (no ``eval``, no sympy parsing).

Expressions use numbers, single-letter variables, ``+ - * / ^``, brackets and implicit
multiplication (``2x``, ``3(x+1)``). Equivalence is checked numerically at random points, which is
exact in practice for the polynomial/rational expressions a step checker sees.
"""

from __future__ import annotations

import ast
import random
import re

_ALLOWED_CHARS = re.compile(r"^[0-9a-zA-Z\s+\-*/^().=,]*$")
_MAX_EXPONENT = 12


class MathError(ValueError):
    """The text is not an expression or equation this checker understands."""


def _prepare(text: str) -> str:
    s = (text.replace("×", "*").replace("·", "*").replace("÷", "/").replace("−", "-")
         .replace("–", "-").replace("²", "^2").replace("³", "^3"))
    if not _ALLOWED_CHARS.match(s):
        raise MathError(f"unsupported characters in {text!r}")
    if re.search(r"[a-zA-Z]{2,}", s):
        raise MathError(f"use single-letter variables: {text!r}")
    s = s.replace("^", "**")
    s = re.sub(r"(\d)\s*([a-zA-Z(])", r"\1*\2", s)
    s = re.sub(r"([a-zA-Z)])\s*([a-zA-Z0-9(])", r"\1*\2", s)
    return s


def parse(text: str) -> ast.AST:
    """AST of one expression (raises MathError)."""
    try:
        tree = ast.parse(_prepare(text).strip(), mode="eval").body
    except SyntaxError:
        raise MathError(f"cannot parse {text!r}") from None
    for node in ast.walk(tree):
        if not isinstance(node, (ast.BinOp, ast.UnaryOp, ast.Constant, ast.Name, ast.Load, ast.Add, ast.Sub,
                                 ast.Mult, ast.Div, ast.Pow, ast.USub, ast.UAdd)):
            raise MathError(f"unsupported syntax in {text!r}")
        if isinstance(node, ast.Constant) and not isinstance(node.value, (int, float)):
            raise MathError(f"unsupported constant in {text!r}")
    return tree


def variables(tree: ast.AST) -> set[str]:
    return {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)}


def evaluate(tree: ast.AST, env: dict[str, float]) -> float:
    """Value of a parsed expression (ZeroDivisionError / OverflowError propagate)."""
    if isinstance(tree, ast.Constant):
        return float(tree.value)
    if isinstance(tree, ast.Name):
        return env[tree.id]
    if isinstance(tree, ast.UnaryOp):
        v = evaluate(tree.operand, env)
        return -v if isinstance(tree.op, ast.USub) else v
    a, b = evaluate(tree.left, env), evaluate(tree.right, env)
    if isinstance(tree.op, ast.Add):
        return a + b
    if isinstance(tree.op, ast.Sub):
        return a - b
    if isinstance(tree.op, ast.Mult):
        return a * b
    if isinstance(tree.op, ast.Div):
        return a / b
    if abs(b) > _MAX_EXPONENT:
        raise OverflowError("exponent too large")
    out = a ** b
    if isinstance(out, complex):
        raise ZeroDivisionError("complex value")
    return out


def split_equation(text: str) -> tuple[ast.AST, ast.AST] | None:
    """(left, right) trees of ``A = B``; None when ``text`` has no ``=``."""
    parts = text.split("=")
    if len(parts) == 1:
        return None
    if len(parts) != 2:
        raise MathError(f"more than one '=' in {text!r}")
    return parse(parts[0]), parse(parts[1])


def _residual(text: str) -> ast.AST:
    """``A - B`` for an equation, the expression itself otherwise."""
    eq = split_equation(text)
    return parse(text) if eq is None else ast.BinOp(eq[0], ast.Sub(), eq[1])


def _samples(names: set[str], n: int = 8, seed: int = 0):
    rng = random.Random(seed)
    for _ in range(n):
        yield {v: rng.uniform(-5.0, 5.0) for v in names}


def _close(a: float, b: float) -> bool:
    return abs(a - b) <= 1e-7 * max(1.0, abs(a), abs(b))


def same_value(a: str, b: str) -> bool:
    """Expressions ``a`` and ``b`` are equal for every value of their variables."""
    ta, tb = parse(a), parse(b)
    names = variables(ta) | variables(tb)
    checked = 0
    for env in _samples(names):
        try:
            va, vb = evaluate(ta, env), evaluate(tb, env)
        except (ZeroDivisionError, OverflowError):
            continue
        if not _close(va, vb):
            return False
        checked += 1
    return checked > 0


def equivalent_equations(a: str, b: str) -> bool:
    """``a`` and ``b`` (``L = R``) have the same solutions: their residuals are proportional."""
    ra, rb = _residual(a), _residual(b)
    names = variables(ra) | variables(rb)
    ratio = None
    checked = 0
    for env in _samples(names):
        try:
            va, vb = evaluate(ra, env), evaluate(rb, env)
        except (ZeroDivisionError, OverflowError):
            continue
        checked += 1
        if _close(vb, 0.0) or _close(va, 0.0):
            if not (_close(vb, 0.0) and _close(va, 0.0)):
                return False
            continue
        r = va / vb
        if ratio is None:
            ratio = r
        elif not _close(r, ratio):
            return False
    return checked > 0


def linear_solution(equation: str) -> tuple[str, float, float, float] | None:
    """``(var, a, b, x)`` when ``equation`` is ``a*var + b = 0`` after moving terms, else None."""
    eq = split_equation(equation)
    if eq is None:
        return None
    res = ast.BinOp(eq[0], ast.Sub(), eq[1])
    names = variables(res)
    if len(names) != 1:
        return None
    (v,) = names
    try:
        f0, f1, f2 = (evaluate(res, {v: x}) for x in (0.0, 1.0, 2.0))
        f7 = evaluate(res, {v: 7.0})
    except (ZeroDivisionError, OverflowError):
        return None
    a, b = f1 - f0, f0
    if _close(a, 0.0) or not _close(f2, 2 * a + b) or not _close(f7, 7 * a + b):
        return None
    return v, a, b, -b / a


def fmt(x: float) -> str:
    """A number as a pupil would write it (integers without ``.0``)."""
    return str(int(round(x))) if _close(x, round(x)) else f"{x:.6g}"
