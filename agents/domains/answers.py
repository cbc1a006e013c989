"""Does a pupil's final answer match the reference? Values, solution sets, units and rounding.

- Values compare exactly (``0.5`` = ``1/2`` = ``2/4``; mixed numbers such as ``1 1/2``; ``x = 3`` = ``3``).
- Solutions compare as sets: ``x = ±2`` = ``x = -2 or x = 2``.
- Units use sympy's unit system (``sympy.physics.units``): ``50 mm`` = ``5 cm``, ``3 km/h`` is a speed,
  ``25%`` = ``0.25``; a number without the reference's unit is not yet correct; currencies
  (``$``, ``£``, ``€``) only match themselves.
- A decimal rounded to at least 2 places matches a reference that has no exact decimal
  (``0.33`` for ``1/3``, ``1.41`` for ``sqrt(2)``), and the feedback says it was rounded.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import sympy as sp
from sympy.physics import units as u
from sympy.physics.units import convert_to

from ossforge.agents.domains import mathexpr as mx

_BASE = [u.meter, u.kilogram, u.second, u.ampere, u.kelvin, u.mole, u.candela]
_DIMENSIONLESS = {u.percent: sp.Rational(1, 100), u.degree: sp.pi / 180}
_CURRENCIES = {"$": "USD", "£": "GBP", "€": "EUR"}


def _unit_table() -> dict[str, sp.Expr]:
    def plural(names, q):
        return {n: q for base in names for n in (base, base + "s")}

    t: dict[str, sp.Expr] = {"mm": u.millimeter, "cm": u.centimeter, "m": u.meter, "km": u.kilometer,
                             "in": u.inch, "ft": u.foot, "yd": u.yard, "mi": u.mile,
                             "mg": u.milligram, "g": u.gram, "kg": u.kilogram, "t": u.tonne, "lb": u.pound,
                             "lbs": u.pound, "oz": u.pound / 16,
                             "ms": u.millisecond, "s": u.second, "sec": u.second, "min": u.minute, "h": u.hour,
                             "hr": u.hour, "hrs": u.hour,
                             "ml": u.milliliter, "mL": u.milliliter, "cl": u.centiliter, "dl": u.deciliter,
                             "l": u.liter, "L": u.liter, "ha": u.hectare, "%": u.percent, "°": u.degree}
    for names, q in ((("millimetre", "millimeter"), u.millimeter), (("centimetre", "centimeter"), u.centimeter),
                     (("metre", "meter"), u.meter), (("kilometre", "kilometer"), u.kilometer),
                     (("inch",), u.inch), (("foot",), u.foot), (("yard",), u.yard), (("mile",), u.mile),
                     (("milligram", "gram", "kilogram", "tonne"), None), (("pound",), u.pound),
                     (("ounce",), u.pound / 16), (("second",), u.second), (("minute",), u.minute),
                     (("hour",), u.hour), (("day",), u.day), (("week",), 7 * u.day),
                     (("millilitre", "milliliter"), u.milliliter), (("litre", "liter"), u.liter),
                     (("hectare",), u.hectare), (("degree",), u.degree), (("percent",), u.percent)):
        if q is None:
            for n, qq in zip(names, (u.milligram, u.gram, u.kilogram, u.tonne)):
                t.update(plural([n], qq))
        else:
            t.update(plural(names, q))
    t["inches"], t["feet"] = u.inch, u.foot
    return t


UNITS = _unit_table()
_UNIT_FACTOR = re.compile(r"^([A-Za-zµ%°]+)(?:\^?(-?\d)|([²³]))?$")


def parse_unit(text: str) -> sp.Expr | None:
    """``km/h``, ``m/s^2``, ``cm²``, ``kg m``, ``miles per hour`` as a sympy unit; None if not a unit."""
    text = text.strip().replace(" per ", "/")
    if not text:
        return None
    out = sp.Integer(1)
    for i, part in enumerate(text.split("/")):
        factors = [f for f in re.split(r"[\s*·]+", part.strip()) if f]
        if not factors:
            return None
        for f in factors:
            m = _UNIT_FACTOR.match(f)
            if not m or m.group(1) not in UNITS:
                return None
            power = int(m.group(2)) if m.group(2) else {"²": 2, "³": 3}.get(m.group(3) or "", 1)
            q = UNITS[m.group(1)] ** power
            out = out * q if i == 0 else out / q
    return out


@dataclass
class Quantity:
    value: sp.Expr
    unit: sp.Expr | None  # None: a plain number
    text: str  # the number as written (for rounding)
    unit_text: str = ""


_MIXED = re.compile(r"^\s*(-?)(\d+)\s+(\d+)\s*/\s*(\d+)\s*$")


def _number(text: str, symbols: bool = False) -> sp.Expr:
    m = _MIXED.match(text)
    if m:
        whole = sp.Integer(m.group(2)) + sp.Rational(int(m.group(3)), int(m.group(4)))
        return -whole if m.group(1) else whole
    expr, _ = mx.expression(text)
    if expr.free_symbols and not symbols:
        raise mx.MathError(f"not a number: {text!r}")
    return expr


def quantity(text: str) -> Quantity:
    """A number with an optional unit or currency: ``12.5 cm^2``, ``$4.50``, ``25%``, ``1 1/2 h``."""
    s = text.strip().rstrip(".").strip()
    for sign, code in _CURRENCIES.items():
        if s.startswith(sign) or s.endswith(sign):
            num = s.strip(sign).strip()
            return Quantity(_number(num), sp.Symbol(code), num, sign)
    m = re.match(r"^(.*?\d[\d\s./()+\-*^]*?)\s*([A-Za-zµ%°][A-Za-zµ%°/^²³\s\d*·-]*)$", s)
    if m:
        unit = parse_unit(m.group(2))
        if unit is not None:
            value, text = _number(m.group(1)), m.group(1).strip()
            factor = unit.subs(_DIMENSIONLESS)
            if factor.is_number:  # %, degrees: dimensionless, a plain number (25% = 0.25)
                return Quantity(value * factor, None, text if factor == 1 else "")
            return Quantity(value, unit, text, m.group(2).strip())
    return Quantity(_number(s, symbols=True), None, s)  # a number or an expression such as 2x + 1


def _rounds_to(answer_text: str, value: sp.Expr) -> int | None:
    """Decimal places when ``answer_text`` is ``value`` rounded to >= 2 places and ``value`` has no exact decimal."""
    m = re.fullmatch(r"\s*-?\d*\.(\d{2,})\s*", answer_text)
    if not m or not value.is_real:
        return None
    if value.is_rational and set(sp.factorint(sp.Rational(value).q)) <= {2, 5}:
        return None  # the reference is an exact decimal: the pupil must give it exactly
    places = len(m.group(1))
    target = sp.Rational(answer_text.strip())
    return places if abs(sp.N(value, 30) - target) <= sp.Rational(1, 2 * 10**places) else None


@dataclass
class Match:
    correct: bool
    note: str = ""  # why, when it is not the plain value: "rounded to 2 decimal places", "missing the unit cm"


def _strip_var(text: str) -> str:
    m = re.match(r"^\s*[a-zA-Z]\s*=\s*([^=]+)$", text)
    return m.group(1) if m and not re.search(r"\bor\b|[,;±]", m.group(1)) else text


def _same_quantity(a: Quantity, b: Quantity) -> bool:
    diff = convert_to(a.value * a.unit - b.value * b.unit, _BASE)
    return sp.simplify(diff) == 0


def compare(answer: str, reference: str) -> Match:
    """Whether ``answer`` matches ``reference`` (raises MathError when either cannot be read)."""
    if mx.is_equation(_strip_var(answer)) or mx.is_equation(_strip_var(reference)):
        same = mx.equivalent_equations(answer, reference)
        return Match(bool(same))
    try:  # letters as algebra first: "3t" = "t*3" although t could be tonnes
        if mx.same_value(_strip_var(answer), _strip_var(reference)):
            return Match(True)
    except mx.MathError:
        pass
    a, b = quantity(_strip_var(answer)), quantity(_strip_var(reference))
    if b.unit is not None and a.unit is None:
        if a.value == b.value:
            return Match(False, f"right number, but give the unit ({b.unit_text})")
        return Match(False)
    if b.unit is None or a.unit == b.unit:
        if mx._equal_values(a.value, b.value):
            return Match(True)
        places = _rounds_to(a.text, b.value)
        return Match(True, f"rounded to {places} decimal places") if places else Match(False)
    if _same_quantity(a, b):
        return Match(True)
    ratio = sp.simplify(convert_to(a.unit / b.unit, _BASE))
    return Match(False, "" if ratio.is_number else "the unit does not measure the same thing as the question asks")

