"""School arithmetic and algebra checked with a computer algebra system (sympy), parsed without ``eval``.

Parsing: the text is tokenised here (numbers, single-letter variables, ``sqrt``/``abs``/``√``,
``+ - * / ^``, brackets, implicit multiplication such as ``2x``, ``3(x+1)``, ``2xy``), read with
Python's ``ast`` in expression mode against a whitelist of node types, and the tree is turned into
sympy objects node by node. User text never reaches ``eval``, ``sympify`` or ``parse_expr``.

Meaning:
- an expression step is right when the difference of the two expressions simplifies to 0;
- an equation step is right when it keeps the solution set. Solutions are real numbers, restricted
  to the domain of the line they come from: every denominator is non-zero, every ``sqrt`` argument
  (and the base of a fractional power) is >= 0. The domain is read from the tree before sympy
  simplifies anything (sympy turns ``x/x`` into ``1``), so ``x/x = 1`` means "any x except 0".
  Multiplying both sides by ``x`` is therefore right only if it neither adds ``x = 0`` nor loses a
  solution; squaring ``sqrt(x) = -3`` into ``x = 9`` gains a solution and is wrong. When both lines have
  no real solution, their complex solutions are compared too (``x^2 = -1`` -> ``x^2 = -4`` is wrong).
- equations in several variables (rearranging formulae) are compared by solving both for one
  variable they share; there only the non-zero denominators are applied, for generic values of the
  other variables.
- ``x = 2 or x = -2``, ``x = 2, x = -2`` and ``x = ±2`` are one line with several solutions.
"""

from __future__ import annotations

import ast
import math
import re
from dataclasses import dataclass, field

import sympy as sp

_MAX_TEXT = 300
_MAX_EXPONENT = 12  # degree limit for powers of expressions with variables (keeps solving fast)
_MAX_DIGITS = 1000  # size limit for number ** number
_FUNCTIONS = {"sqrt": sp.sqrt, "abs": sp.Abs}
_TOKEN = re.compile(r"\s*(?:(?P<num>\d+\.?\d*|\.\d+)|(?P<word>[a-zA-Z]+)|(?P<root>√)|(?P<op>\*\*|[-+*/^(),=]))")
_ALLOWED_NODES = (ast.BinOp, ast.UnaryOp, ast.Constant, ast.Name, ast.Load, ast.Call, ast.Add, ast.Sub,
                  ast.Mult, ast.Div, ast.Pow, ast.USub, ast.UAdd)


class MathError(ValueError):
    """The text is not an expression or equation this checker understands."""


# ---------------------------------------------------------------- text -> ast


def _normalise(text: str) -> str:
    if len(text) > _MAX_TEXT:
        raise MathError(f"expression longer than {_MAX_TEXT} characters")
    return (text.replace("×", "*").replace("·", "*").replace("÷", "/").replace("−", "-").replace("–", "-")
            .replace("²", "^2").replace("³", "^3"))


def _tokens(text: str) -> list[tuple[str, str]]:
    out, pos, s = [], 0, _normalise(text)
    while pos < len(s):
        if s[pos:].strip() == "":
            break
        m = _TOKEN.match(s, pos)
        if not m:
            raise MathError(f"unsupported character {s[pos:].strip()[0]!r} in {text!r}")
        pos = m.end()
        kind = m.lastgroup
        value = m.group(kind)
        if kind == "word":
            if value in _FUNCTIONS:
                out.append(("func", value))
            elif len(value) > 3:
                raise MathError(f"use single-letter variables (or sqrt, abs): {text!r}")
            else:
                out.extend(("var", c) for c in value)  # 2xy = 2·x·y
        elif kind == "root":
            out.append(("func", "sqrt"))
            out.append(("root", "√"))
        else:
            out.append((kind, value))
    return out


def _python_source(text: str) -> str:
    """The expression as Python syntax: ``^`` -> ``**``, implicit products made explicit."""
    toks = _tokens(text)
    parts: list[str] = []
    prev = None
    i = 0
    while i < len(toks):
        kind, value = toks[i]
        if kind == "root":  # √x, √16, √(x+1): sqrt applied to the next atom
            nxt = toks[i + 1] if i + 1 < len(toks) else None
            if nxt is None or nxt[0] not in ("num", "var", "op") or (nxt[0] == "op" and nxt[1] != "("):
                raise MathError(f"nothing to take the square root of in {text!r}")
            if nxt[0] != "op":
                parts += ["(", nxt[1], ")"]
                prev = ("op", ")")
                i += 2
                continue
            i += 1
            continue
        starts_operand = kind in ("num", "var", "func") or (kind == "op" and value == "(")
        ends_operand = prev is not None and (prev[0] in ("num", "var") or prev == ("op", ")"))
        if starts_operand and ends_operand:
            if prev[0] == "num" and kind == "num":
                raise MathError(f"two numbers in a row in {text!r}")
            parts.append("*")
        if prev is not None and prev[0] == "func" and not (kind in ("op", "root") and value in ("(", "√")):
            raise MathError(f"write {prev[1]}(...) with brackets in {text!r}")
        parts.append("**" if value == "^" else value)
        prev = (kind, value)
        i += 1
    return " ".join(parts)


def parse(text: str) -> ast.AST:
    """Whitelisted AST of one expression (raises MathError)."""
    if "=" in text:
        raise MathError(f"expected an expression, not an equation: {text!r}")
    source = _python_source(text)
    if not source.strip():
        raise MathError("empty expression")
    try:
        tree = ast.parse(source, mode="eval").body
    except SyntaxError:
        raise MathError(f"cannot parse {text!r}") from None
    for node in ast.walk(tree):
        if not isinstance(node, _ALLOWED_NODES):
            raise MathError(f"unsupported syntax in {text!r}")
        if isinstance(node, ast.Constant) and (isinstance(node.value, bool) or not isinstance(node.value, (int, float))):
            raise MathError(f"unsupported constant in {text!r}")
        if isinstance(node, ast.Call) and (not isinstance(node.func, ast.Name) or node.func.id not in _FUNCTIONS
                                           or len(node.args) != 1 or node.keywords):
            raise MathError(f"unsupported function call in {text!r}")
    return tree


def variables(tree: ast.AST) -> set[str]:
    funcs = {id(n.func) for n in ast.walk(tree) if isinstance(n, ast.Call)}
    return {n.id for n in ast.walk(tree) if isinstance(n, ast.Name) and id(n) not in funcs}


# ---------------------------------------------------------------- ast -> sympy


@dataclass
class Domain:
    """Where an expression is defined over the reals: these must be non-zero / non-negative."""

    nonzero: list[sp.Expr] = field(default_factory=list)
    nonnegative: list[sp.Expr] = field(default_factory=list)

    def __add__(self, other: "Domain") -> "Domain":
        return Domain(self.nonzero + other.nonzero, self.nonnegative + other.nonnegative)


def _number(value) -> sp.Expr:
    # decimals are exact: 0.1 is 1/10 (repr is the shortest text that reads back as the same float)
    return sp.Integer(value) if isinstance(value, int) else sp.Rational(repr(value))


def to_sympy(tree: ast.AST, domain: Domain | None = None) -> sp.Expr:
    """The sympy expression of a parsed tree; records denominators and roots in ``domain``."""
    domain = domain if domain is not None else Domain()
    if isinstance(tree, ast.Constant):
        return _number(tree.value)
    if isinstance(tree, ast.Name):
        return sp.Symbol(tree.id)
    if isinstance(tree, ast.UnaryOp):
        v = to_sympy(tree.operand, domain)
        return -v if isinstance(tree.op, ast.USub) else v
    if isinstance(tree, ast.Call):
        arg = to_sympy(tree.args[0], domain)
        if tree.func.id == "sqrt":
            if arg.is_number and arg.is_negative:
                raise MathError(f"sqrt({sp.sstr(arg)}) is not a real number")
            domain.nonnegative.append(arg)
        return _FUNCTIONS[tree.func.id](arg)
    a, b = to_sympy(tree.left, domain), to_sympy(tree.right, domain)
    if isinstance(tree.op, ast.Add):
        return a + b
    if isinstance(tree.op, ast.Sub):
        return a - b
    if isinstance(tree.op, ast.Mult):
        return a * b
    if isinstance(tree.op, ast.Div):
        if b == 0:
            raise MathError("division by zero")
        domain.nonzero.append(b)
        return a / b
    return _power(a, b, domain)


def _power(base: sp.Expr, exp: sp.Expr, domain: Domain) -> sp.Expr:
    if exp.is_number:
        if not exp.is_real:
            raise MathError("unsupported exponent")
        if base.free_symbols and abs(exp) > _MAX_EXPONENT:
            raise MathError(f"exponents above {_MAX_EXPONENT} are not supported")
        if base.is_number and base != 0 and abs(float(exp)) * max(math.log10(abs(complex(base))), 1) > _MAX_DIGITS:
            raise MathError("number too large")
        if base.is_number and base.is_negative and not exp.is_integer:
            raise MathError(f"({sp.sstr(base)})^({sp.sstr(exp)}) is not a real number")
        if base == 0 and exp.is_negative:
            raise MathError("division by zero")
        if exp.is_negative:
            domain.nonzero.append(base)
        if not exp.is_integer:
            domain.nonnegative.append(base)
    elif base.free_symbols:
        domain.nonnegative.append(base)  # x^y is defined for x >= 0 when y varies (real answers)
    return sp.Pow(base, exp)


def expression(text: str) -> tuple[sp.Expr, Domain]:
    """Sympy expression of ``text`` and the conditions where it is defined."""
    domain = Domain()
    return to_sympy(parse(text), domain), domain


# ---------------------------------------------------------------- equations


@dataclass
class Equation:
    """One line ``L = R`` (or several alternatives ``x = 2 or x = -2``): residuals ``L - R`` and domain."""

    residuals: list[sp.Expr]
    domain: Domain

    @property
    def symbols(self) -> set[sp.Symbol]:
        out: set[sp.Symbol] = set()
        for r in self.residuals:
            out |= r.free_symbols
        for e in self.domain.nonzero + self.domain.nonnegative:
            out |= e.free_symbols
        return out


def is_equation(text: str) -> bool:
    return "=" in text


def _alternatives(text: str) -> list[str]:
    parts = [p for p in re.split(r"\bor\b|[,;]", text)]
    out = []
    for p in parts:
        if p.count("±") > 1:
            raise MathError(f"use one ± per equation: {text!r}")
        out += [p.replace("±", "+"), p.replace("±", "-")] if "±" in p else [p]
    return out


def equation(text: str) -> Equation:
    """Parse ``A = B`` (or alternatives joined by ``or`` / commas / ``±``)."""
    residuals, domain = [], Domain()
    for part in _alternatives(text):
        sides = part.split("=")
        if len(sides) != 2:
            raise MathError(f"each equation needs exactly one '=': {part.strip()!r}")
        (left, dl), (right, dr) = expression(sides[0]), expression(sides[1])
        residuals.append(left - right)
        domain = domain + dl + dr
    if len(residuals) > 1 and len({frozenset(r.free_symbols) for r in residuals}) > 1:
        raise MathError(f"alternatives must all be in the same variable: {text!r}")
    return Equation(residuals, domain)


def _real_domain(domain: Domain, v: sp.Symbol) -> sp.Set:
    out = sp.S.Reals
    for e in domain.nonzero:
        out = out - sp.solveset(e, v, sp.S.Reals)
    for e in domain.nonnegative:
        out = out.intersect(sp.solveset(sp.Ge(e, 0), v, sp.S.Reals))
    return out


def _decided(s: sp.Set) -> bool:
    return not s.has(sp.ConditionSet) and not s.has(sp.ImageSet)


def solutions(eq: Equation, v: sp.Symbol, complex_: bool = False) -> sp.Set | None:
    """The solution set of ``eq`` for ``v`` (reals within the domain, or complexes); None: undecided."""
    dom = sp.S.Complexes if complex_ else sp.S.Reals
    out: sp.Set = sp.S.EmptySet
    for r in eq.residuals:
        out = out.union(sp.solveset(r, v, dom))
    if complex_:
        for e in eq.domain.nonzero:
            out = out - sp.solveset(e, v, sp.S.Complexes)
    else:
        out = out.intersect(_real_domain(eq.domain, v))
    return out if _decided(out) else None


def same_set(a: sp.Set, b: sp.Set) -> bool:
    """Equal sets, comparing finite sets' elements by value (``sqrt(2)/2`` is ``1/sqrt(2)``)."""
    if a == b:
        return True
    if isinstance(a, sp.FiniteSet) and isinstance(b, sp.FiniteSet):
        if len(a) != len(b):
            return False
        rest = list(b)
        for x in a:
            hit = next((y for y in rest if _equal_values(x, y)), None)
            if hit is None:
                return False
            rest.remove(hit)
        return True
    try:
        return bool(sp.Complement(a, b).is_empty) and bool(sp.Complement(b, a).is_empty)
    except (TypeError, NotImplementedError):
        return False


def _equal_values(a: sp.Expr, b: sp.Expr) -> bool:
    d = a - b
    if d == 0 or sp.simplify(d) == 0:
        return True
    return bool(d.equals(0))


def _generic_solutions(eq: Equation, v: sp.Symbol) -> sp.Set | None:
    """Solutions for ``v`` in terms of the other variables (complex, denominators non-zero)."""
    out: sp.Set = sp.S.EmptySet
    for r in eq.residuals:
        s = sp.solveset(r, v, sp.S.Complexes)
        if not isinstance(s, sp.FiniteSet):
            return None
        out = out.union(s)
    kept = [x for x in out if not any(sp.simplify(e.subs(v, x)) == 0 for e in eq.domain.nonzero)]
    return sp.FiniteSet(*kept)


def equivalent_equations(a: str, b: str) -> bool | None:
    """``a`` and ``b`` have the same solutions (see the module docstring); None: cannot decide."""
    ea, eb = equation(a), equation(b)
    names = sorted(ea.symbols | eb.symbols, key=lambda s: s.name)
    if not names:  # 2 + 2 = 4 -> 4 = 4: both true or both false
        return _truth(ea) == _truth(eb)
    if len(names) == 1:
        (v,) = names
        if _proportional(ea, eb, v):
            return True
        if _solution_missed(ea, eb, v):
            return False
        sa, sb = solutions(ea, v), solutions(eb, v)
        if sa is None or sb is None:
            return None
        if not same_set(sa, sb):
            return False
        if sa.is_empty:  # no real solutions either way: compare the complex ones
            ca, cb = solutions(ea, v, complex_=True), solutions(eb, v, complex_=True)
            if ca is not None and cb is not None:
                return same_set(ca, cb)
        return True
    shared = [s for s in names if all(s in r.free_symbols for r in ea.residuals + eb.residuals)]
    if not shared:
        return None
    sa, sb = _generic_solutions(ea, shared[0]), _generic_solutions(eb, shared[0])
    if sa is None or sb is None:
        return None
    return same_set(sa, sb)


def _proportional(ea: Equation, eb: Equation, v: sp.Symbol) -> bool:
    """Fast path: one residual each, a non-zero constant multiple of the other, same domain (moving terms)."""
    if len(ea.residuals) != 1 or len(eb.residuals) != 1 or eb.residuals[0] == 0:
        return False
    ratio = sp.cancel(ea.residuals[0] / eb.residuals[0])
    if not (ratio.is_number and ratio != 0 and ratio.is_finite):
        return False
    return same_set(_real_domain(ea.domain, v), _real_domain(eb.domain, v))


def _is_zero(e: sp.Expr) -> bool:
    """Exact zero test for a number: a 50-digit evaluation rules out clear non-zeros, sympy decides the rest."""
    if e == 0:
        return True
    if e.is_number:
        value = sp.N(e, 50)
        if value.is_number and abs(complex(value)) > 1e-30:
            return False
    return sp.simplify(e) == 0 or bool(e.equals(0))


def _satisfies(eq: Equation, v: sp.Symbol, x: sp.Expr) -> bool:
    def zero(e):
        return _is_zero(e.subs(v, x))

    if any(zero(e) for e in eq.domain.nonzero):
        return False
    if any(sp.simplify(e.subs(v, x)).is_negative for e in eq.domain.nonnegative):
        return False
    return any(zero(r) for r in eq.residuals)


def _solution_missed(ea: Equation, eb: Equation, v: sp.Symbol) -> bool:
    """Fast path for wrong steps: solve the simpler line only and try its solutions in the other."""
    small, big = sorted((ea, eb), key=lambda e: sum(sp.count_ops(r) for r in e.residuals))
    sol = solutions(small, v)
    if not isinstance(sol, sp.FiniteSet) or len(sol) > 12:
        return False
    return any(x.is_real and not _satisfies(big, v, x) for x in sol)


def _truth(eq: Equation) -> bool:
    return any(sp.simplify(r) == 0 for r in eq.residuals)


def same_value(a: str, b: str) -> bool:
    """Expressions ``a`` and ``b`` are equal wherever both are defined (difference simplifies to 0)."""
    (ea, _), (eb, _) = expression(a), expression(b)
    return _equal_values(ea, eb)


def domain_note(a: str, b: str) -> str:
    """``" (for x ≠ 0)"`` when ``a`` and ``b`` are defined for different values, else ``""``."""
    (ea, da), (eb, db) = expression(a), expression(b)
    names = sorted(Equation([ea, eb], da + db).symbols, key=lambda s: s.name)
    if len(names) != 1:
        return ""
    (v,) = names
    ra, rb = _real_domain(da, v), _real_domain(db, v)
    if same_set(ra, rb):
        return ""
    excluded = sp.Complement(sp.S.Reals, ra.intersect(rb))
    if isinstance(excluded, sp.FiniteSet):
        return " (for " + ", ".join(f"{v} ≠ {sp.sstr(x)}" for x in excluded) + ")"
    return " (where both sides are defined)"


# ---------------------------------------------------------------- numbers for hints


def evaluate(tree: ast.AST, env: dict[str, float]) -> float:
    """Float value of a parsed tree (ZeroDivisionError / OverflowError propagate); used by the hints."""
    expr = to_sympy(tree)
    value = expr.subs({sp.Symbol(k): sp.Float(v) for k, v in env.items()})
    if value.has(sp.zoo, sp.nan, sp.oo, -sp.oo):
        raise ZeroDivisionError("undefined value")
    value = complex(sp.N(value))
    if abs(value.imag) > 1e-12:
        raise ZeroDivisionError("complex value")
    return value.real


def linear_solution(equation_text: str) -> tuple[str, float, float, float] | None:
    """``(var, a, b, x)`` when ``equation_text`` is ``a*var + b = 0`` after moving terms, else None."""
    if not is_equation(equation_text) or equation_text.count("=") != 1:
        return None
    eq = equation(equation_text)
    (res,) = eq.residuals
    names = res.free_symbols
    if len(names) != 1 or eq.domain.nonzero or eq.domain.nonnegative:
        return None
    (v,) = names
    poly = sp.Poly(sp.expand(res), v) if sp.expand(res).is_polynomial(v) else None
    if poly is None or poly.degree() != 1:
        return None
    a, b = (float(c) for c in poly.all_coeffs())
    return v.name, a, b, -b / a


def _close(a: float, b: float) -> bool:
    return abs(a - b) <= 1e-7 * max(1.0, abs(a), abs(b))


def fmt(x: float) -> str:
    """A number as a pupil would write it (integers without ``.0``)."""
    return str(int(round(x))) if _close(x, round(x)) else f"{x:.6g}"
