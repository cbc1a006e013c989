"""Domain tools, the registry and schema normalisation (redaction: test_redact.py, maths: test_mathexpr.py)."""

from __future__ import annotations

import json

import pytest
from langchain_core.tools import ToolException

from ossforge.agents.domains import education as edu
from ossforge.agents.domains import load
from ossforge.agents.domains import medicine as med
from ossforge.agents.schema import ToolNames, normalize_schema
from ossforge.agents.tools import ToolRegistry


def test_dose_calc_and_cap():
    assert med.dose_calc(10, 20) == "200 mg"
    assert med.dose_calc(15, 80, 1000) == "1000 mg (capped at max_dose_mg; weight-based dose 1200 mg)"
    assert med.dose_calc(0.15, 13) == "1.95 mg"


def test_dose_calc_rejects_bad_args_through_registry():
    reg = med.registry()
    assert reg.run("dose_calc", {"mg_per_kg": 10, "weight_kg": 20}) == "200 mg"
    with pytest.raises(Exception, match="weight_kg"):
        reg.run("dose_calc", {"mg_per_kg": 10, "weight_kg": -3})


@pytest.mark.parametrize("value,a,b,out", [(22, "lb", "kg", "9.97903 kg"), (0.5, "g", "mg", "500 mg"),
                                           (250, "mcg", "mg", "0.25 mg"), (38.5, "degC", "degF", "101.3 degF"),
                                           (2, "tsp", "mL", "10 mL"), (98.6, "F", "C", "37 C")])
def test_unit_convert(value, a, b, out):
    assert med.unit_convert(value, a, b) == out


def test_unit_convert_incompatible():
    with pytest.raises(ToolException, match="cannot convert"):
        med.unit_convert(1, "mg", "mL")


def test_drug_lookup_has_sources_and_aliases():
    row = json.loads(med.drug_lookup("Tylenol"))
    assert row["name"] == "paracetamol" and "WHO" in row["source"]
    for name in {r["name"] for r in med.drug_table().values()}:
        assert json.loads(med.drug_lookup(name))["source"]
    with pytest.raises(ToolException, match="not in the local drug table"):
        med.drug_lookup("../../etc/passwd")


def test_guideline_search_cites_source():
    out = med.guideline_search("fever in a 2 month old baby")
    assert out.startswith("[NICE NG143")
    assert "no matching" in med.guideline_search("zzz")


@pytest.mark.parametrize("text,flags", [
    ("he has chest pain and is sweating", ["chest pain"]),
    ("she can't breathe properly", ["breathing difficulty"]),
    ("my daughter has a stiff neck and fever", ["meningitis signs"]),
    ("what is the paracetamol dose for 20 kg?", []),
])
def test_red_flags(text, flags):
    assert med.red_flags(text) == flags


@pytest.mark.parametrize("prev,cur,ok", [
    ("2x + 3 = 7", "2x = 4", True), ("2x + 3 = 7", "x = 2", True), ("2x + 3 = 7", "2x = 10", False),
    ("3(x + 1)", "3x + 3", True), ("3(x + 1)", "3x + 1", False), ("37 × 4", "148", True),
    ("x^2 = 4", "(x-2)(x+2) = 0", True), ("x^2 = 4", "x = 2", False), ("1/2 + 1/3", "5/6", True),
])
def test_check_step(prev, cur, ok):
    assert edu.check_step(prev, cur).startswith("correct" if ok else "incorrect")


def test_check_step_rejects_code():
    with pytest.raises(ToolException):
        edu.check_step("__import__('os').system('ls')", "1")


@pytest.mark.parametrize("problem,answer", [("3x - 5 = 10", "5"), ("4x + 8 = 20", "3"), ("37 * 4", "148"),
                                            ("x + 4 = 7", "3"), ("10 = 2x + 4", "3")])
def test_hints_never_reveal_answer(problem, answer):
    hints = [edu.give_hint(problem, level) for level in (1, 2, 3)]
    assert len(set(hints)) >= 2  # the ladder moves
    for level, h in enumerate(hints, 1):
        prefix = f"hint {level}/3: "
        assert h.startswith(prefix)
        assert not edu._reveals(h[len(prefix):], answer), h


def test_grade_answer_with_rubric():
    out = json.loads(edu.grade_answer("x = 2", "2", work="subtract 3 from both sides, then divide by 2",
                                      rubric=[{"criterion": "subtracts 3", "points": 1, "keywords": ["subtract 3"]},
                                              {"criterion": "checks answer", "points": 1, "keywords": ["check"]}]))
    assert out == {"correct": True, "score": 2.0, "max_score": 3.0,
                   "feedback": ["final answer correct", "subtracts 3: met", "checks answer: not met"]}
    assert json.loads(edu.grade_answer("0.5", "1/2"))["correct"]
    assert not json.loads(edu.grade_answer("3", "2"))["correct"]


def test_published_tool_names():
    assert load("medicine").registry().names() == ["dose_calc", "unit_convert", "drug_lookup", "guideline_search"]
    assert load("education").registry().names() == ["check_step", "give_hint", "grade_answer"]
    spec = {t["name"]: t for t in load("medicine").registry().as_dataset_tools()}["dose_calc"]
    assert spec["parameters"]["required"] == ["mg_per_kg", "weight_kg"]
    assert spec["parameters"]["properties"]["max_dose_mg"]["nullable"] is True


def test_registry_policy():
    reg = ToolRegistry()
    entry = reg.register(med.dose_calc, risk="high")
    assert entry.requires_approval and reg.names() == ["dose_calc"]
    with pytest.raises(ValueError, match="twice"):
        reg.register(med.dose_calc)
    with pytest.raises(ValueError, match="risk"):
        ToolRegistry().register(med.dose_calc, risk="extreme")


def test_normalize_schema():
    schema = {"type": "object", "$defs": {"U": {"type": "string", "enum": ["mg", "g"], "title": "U"}},
              "properties": {"a": {"anyOf": [{"type": "number"}, {"type": "null"}], "default": None},
                             "b": {"$ref": "#/$defs/U", "description": "unit"},
                             "c": {"anyOf": [{"type": "number"}, {"type": "string"}]}}}
    out = normalize_schema(schema)
    assert out["properties"]["a"] == {"type": "number", "nullable": True, "default": None}
    assert out["properties"]["b"] == {"type": "string", "enum": ["mg", "g"], "description": "unit"}
    assert out["properties"]["c"] == {"oneOf": [{"type": "number"}, {"type": "string"}]}
    assert "$defs" not in out


def test_tool_names_mapping():
    names = ToolNames(["ok_name", "has-dash", "has.dot", "has_dash", "9lives"])
    assert names.harmony("ok_name") == "ok_name"
    assert names.harmony("has-dash") == "has_dash"
    assert names.harmony("has_dash") == "has_dash_2"
    assert names.harmony("has.dot") == "has_dot" and names.user("has_dot") == "has.dot"
    assert names.harmony("9lives") == "_9lives"
    assert names.user("missing") is None


def test_domain_tools_cannot_reach_shell_or_files():
    """The tool modules import no process/file APIs and read only their packaged data."""
    import ast
    import inspect

    from ossforge.agents.domains import answers, mathexpr

    for mod in (med, edu, mathexpr, answers):
        tree = ast.parse(inspect.getsource(mod))
        imported = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom))
                    for a in n.names} | {n.module.split(".")[0] for n in ast.walk(tree)
                                         if isinstance(n, ast.ImportFrom) and n.module}
        assert not imported & {"os", "subprocess", "shutil", "pathlib", "socket", "urllib"}, mod.__name__
        called = {n.func.id for n in ast.walk(tree) if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)}
        assert not called & {"open", "eval", "exec", "compile", "__import__"}, mod.__name__
