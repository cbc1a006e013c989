"""Medicine assistant: dose and unit calculators, a local drug table and guideline snippets.

Tools compute and look things up; they never diagnose. Everything they read lives in
``ossforge/agents/data`` (opened through importlib.resources, never a user-given path).
"""

from __future__ import annotations

import csv
import functools
import io
import json
import re
from importlib import resources
from typing import Optional

from langchain_core.tools import StructuredTool, ToolException
from pydantic import BaseModel, Field

from ossforge.agents.tools import ToolRegistry

DISCLAIMER = ("This assistant gives general medical information, not a diagnosis or a personal "
              "treatment plan. Check doses against your local formulary and ask a clinician or "
              "pharmacist before acting on them.")

SYSTEM_PROMPT = (
    "You are a careful medical information assistant for clinicians and caregivers. "
    "Use the tools for every dose calculation, unit conversion and drug fact; cite the source the "
    "tool returns. Never give a diagnosis; explain what the information means and when to seek care. "
    "If the user describes an emergency symptom, tell them to call emergency services first. "
    "Keep answers short and end with: " + DISCLAIMER
)

# Symptoms that need emergency care now: the assistant escalates before anything else.
RED_FLAGS = {
    "chest pain": r"\bchest (pain|pressure|tightness)\b",
    "breathing difficulty": r"\b(can'?t|cannot|unable to|trouble|difficulty|struggling to) breath|\bshort(ness)? of breath\b|\bnot breathing\b",
    "stroke signs": r"\b(face (is )?droop|slurred speech|one side (of (the|his|her|my) body )?(is )?(weak|numb))",
    "loss of consciousness": r"\b(unconscious|unresponsive|passed out|won'?t wake)\b",
    "seizure": r"\b(seizure|convulsion|fitting)\b",
    "severe bleeding": r"\b(severe|heavy|uncontrolled|won'?t stop) bleeding\b|\bbleeding (heavily|won'?t stop)\b",
    "anaphylaxis": r"\b(throat|tongue|lips?) (is |are )?(swelling|swollen|closing)\b|\banaphyla",
    "suicidal thoughts": r"\b(suicid|kill (myself|himself|herself)|end (my|his|her) life)\b",
    "overdose": r"\boverdose\b|\btook too many\b",
    "meningitis signs": r"\bstiff neck\b|\bnon-?blanching rash\b",
    "blue skin or lips": r"\b(blue|grey|gray) (lips|skin|face)\b",
}
_RED_FLAG_RES = {name: re.compile(p, re.IGNORECASE) for name, p in RED_FLAGS.items()}

ESCALATION = ("This may be an emergency ({flags}). Call your local emergency number (for example 911, 112 "
              "or 999) or go to the nearest emergency department now; do not wait for an online answer.")


def red_flags(text: str) -> list[str]:
    """Names of the emergency symptoms mentioned in ``text`` (empty when none)."""
    return [name for name, rx in _RED_FLAG_RES.items() if rx.search(text or "")]


# ---------------------------------------------------------------- local data


def _data_text(name: str) -> str:
    return resources.files("ossforge.agents.data").joinpath(name).read_text(encoding="utf-8")


@functools.lru_cache(maxsize=1)
def drug_table() -> dict[str, dict[str, str]]:
    """Drug rows keyed by lower-case name and every alias."""
    table: dict[str, dict[str, str]] = {}
    for row in csv.DictReader(io.StringIO(_data_text("drugs.csv"))):
        for key in [row["name"], *filter(None, row["aliases"].split(";"))]:
            table[key.strip().lower()] = row
    return table


@functools.lru_cache(maxsize=1)
def guidelines() -> list[dict]:
    return [json.loads(line) for line in _data_text("guidelines.jsonl").splitlines() if line.strip()]


# ---------------------------------------------------------------- tools


class DoseCalcArgs(BaseModel):
    mg_per_kg: float = Field(gt=0, le=1000, description="dose in mg per kg of body weight")
    weight_kg: float = Field(gt=0, le=400, description="patient weight in kg")
    max_dose_mg: Optional[float] = Field(default=None, gt=0, description="maximum single dose in mg, if any")


def dose_calc(mg_per_kg: float, weight_kg: float, max_dose_mg: Optional[float] = None) -> str:
    """Weight-based single dose in mg, capped at the maximum dose when one is given."""
    dose = round(mg_per_kg * weight_kg, 2)
    if max_dose_mg is not None and dose > max_dose_mg:
        return f"{max_dose_mg:g} mg (capped at max_dose_mg; weight-based dose {dose:g} mg)"
    return f"{dose:g} mg"


class UnitConvertArgs(BaseModel):
    value: float = Field(description="the amount to convert")
    from_unit: str = Field(description="unit of value, e.g. mg, g, mcg, kg, lb, mL, L, tsp, degC, degF")
    to_unit: str = Field(description="unit to convert to")


# Linear units by dimension, factor to the dimension's base unit.
_UNITS = {
    "mass": {"mcg": 1e-6, "ug": 1e-6, "microgram": 1e-6, "micrograms": 1e-6, "mg": 1e-3, "g": 1.0,
             "kg": 1e3, "lb": 453.59237, "lbs": 453.59237, "oz": 28.349523125},
    "volume": {"ml": 1e-3, "l": 1.0, "dl": 0.1, "tsp": 5e-3, "tbsp": 15e-3, "fl oz": 29.5735295625e-3},
}
_TEMPS = {"c": "c", "degc": "c", "°c": "c", "celsius": "c", "f": "f", "degf": "f", "°f": "f", "fahrenheit": "f"}


def unit_convert(value: float, from_unit: str, to_unit: str) -> str:
    """Convert mass, volume or temperature between units."""
    a, b = from_unit.strip().lower(), to_unit.strip().lower()
    if a in _TEMPS and b in _TEMPS:
        a, b = _TEMPS[a], _TEMPS[b]
        out = value if a == b else (value * 9 / 5 + 32 if a == "c" else (value - 32) * 5 / 9)
        return f"{round(out, 2):g} {to_unit.strip()}"
    for units in _UNITS.values():
        if a in units and b in units:
            out = value * units[a] / units[b]
            return f"{float(f'{out:.6g}'):g} {to_unit.strip()}"
    raise ToolException(f"cannot convert {from_unit!r} to {to_unit!r} (known: "
                        f"{', '.join([*_UNITS['mass'], *_UNITS['volume'], 'degC', 'degF'])})")


class DrugLookupArgs(BaseModel):
    name: str = Field(description="generic or brand name of the drug, e.g. paracetamol")


def drug_lookup(name: str) -> str:
    """Reference facts about a drug from the local table, with their source."""
    row = drug_table().get(name.strip().lower())
    if row is None:
        known = sorted({r["name"] for r in drug_table().values()})
        raise ToolException(f"{name!r} is not in the local drug table (known: {', '.join(known)})")
    fields = ("name", "drug_class", "adult_dose", "pediatric_dose", "max_daily", "notes", "source")
    return json.dumps({k: row[k] for k in fields}, ensure_ascii=False)


class GuidelineSearchArgs(BaseModel):
    query: str = Field(description="topic or question, e.g. 'fever in infants'")


def guideline_search(query: str) -> str:
    """Up to two guideline snippets matching the query, each with its source."""
    words = set(re.findall(r"[a-z]+", query.lower()))
    scored = []
    for g in guidelines():
        score = len(words & set(g["keywords"])) + len(words & set(re.findall(r"[a-z]+", g["topic"])))
        if score:
            scored.append((score, g))
    scored.sort(key=lambda s: -s[0])
    if not scored:
        return "no matching guideline snippet in the local library"
    return "\n".join(f"[{g['source']}] {g['text']}" for _, g in scored[:2])


def registry() -> ToolRegistry:
    """The medicine tools (all read-only calculators/lookups: low risk, no approval)."""
    reg = ToolRegistry()
    for fn, schema in ((dose_calc, DoseCalcArgs), (unit_convert, UnitConvertArgs),
                       (drug_lookup, DrugLookupArgs), (guideline_search, GuidelineSearchArgs)):
        reg.register(StructuredTool.from_function(fn, args_schema=schema), risk="low", timeout_s=5.0)
    return reg
