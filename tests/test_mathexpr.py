"""Step checking and answer grading on sympy: solution sets, domains, units, the safe parser."""

from __future__ import annotations

import json

import pytest
import sympy as sp
from langchain_core.tools import ToolException

from ossforge.agents.domains import answers
from ossforge.agents.domains import education as edu
from ossforge.agents.domains import mathexpr as mx

# the cases from issue 15 that the old "proportional residuals" heuristic got wrong
ISSUE_CASES = [("1/x = 2", "x = 1/2"), ("2/x = 4", "x = 1/2"), ("(x-2)^2 = 0", "x - 2 = 0"), ("sqrt(x) = 3", "x = 9")]

# (previous, current, correct): each kind of step, right and wrong
STEPS = [
    # division and cross-multiplication
    ("6/x = 3", "6 = 3x", True), ("6/x = 3", "x = 2", True), ("6/x = 3", "x = 18", False),
    ("3/(x+1) = 1", "x + 1 = 3", True), ("3/(x+1) = 1", "x = 3", False),
    ("x/4 = 5/2", "2x = 20", True), ("x/4 = 5/2", "x = 10", True), ("x/4 = 5/2", "x = 5/8", False),
    ("12 = 4(x - 1)", "3 = x - 1", True), ("12 = 4(x - 1)", "x = 4", True), ("12 = 4(x - 1)", "x = 2", False),
    # roots
    ("sqrt(x + 7) = 4", "x + 7 = 16", True), ("sqrt(x + 7) = 4", "x = 9", True), ("sqrt(x + 7) = 4", "x = -3", False),
    ("√x = 5", "x = 25", True), ("2√x = 8", "√x = 4", True), ("sqrt(x) = -2", "x = 4", False),
    ("x^2 = 9", "x = 3 or x = -3", True), ("x^2 = 9", "x = ±3", True), ("x^2 = 9", "x = 3, x = -3", True), ("x^2 = 9", "x = 3", False),
    ("x^2 = 9", "x = -3", False), ("x^3 = 27", "x = 3", True),
    # squares and factorising
    ("(x+3)^2 = 0", "x = -3", True), ("(x - 1)^2 = 4", "x - 1 = 2", False), ("(x - 1)^2 = 4", "x - 1 = ±2", True),
    ("x² - 5x + 6 = 0", "(x-2)(x-3) = 0", True), ("x^2 - 5x + 6 = 0", "x = 2 or x = 3", True),
    ("x^2 - 5x + 6 = 0", "(x+2)(x+3) = 0", False), ("x^2 = 5x", "x = 5", False), ("x^2 = 5x", "x = 0 or x = 5", True),
    # fractions
    ("x/2 + x/3 = 5", "3x + 2x = 30", True), ("x/2 + x/3 = 5", "5x/6 = 5", True), ("x/2 + x/3 = 5", "x = 6", True),
    ("x/2 + x/3 = 5", "x/5 = 5", False), ("2/3 x = 4", "x = 6", True), ("0.5x = 1.5", "x = 3", True),
    # domain restrictions: multiplying through by an expression must not add or lose solutions
    ("x/(x-2) = 2/(x-2)", "x = 2", False),  # 2 is excluded from the original: no solution
    ("(x^2 - 4)/(x - 2) = 4", "x + 2 = 4", False),  # gains x = 2
    ("(x^2 - 4)/(x - 2) = 5", "x + 2 = 5", True),  # same solution x = 3, the excluded point is not one
    ("1/x = 1/x", "1 = 1", False),  # the first holds for x != 0 only
    ("x^2 = -1", "x^2 = -4", False), ("x^2 + 1 = 0", "x^2 = -1", True),  # no real roots: complex ones compared
    # identities, contradictions, literal equations
    ("2(x + 1) = 2x + 2", "0 = 0", True), ("x + 1 = x", "1 = 0", True), ("2x + 3 = 7", "2x = 10", False),
    ("v = u + a t", "a = (v - u)/t", True), ("v = u + a t", "a = v - u/t", False), ("2x + 3y = 6", "y = 2 - 2/3 x", True),
]


@pytest.mark.parametrize("prev,cur", ISSUE_CASES)
def test_issue_cases_are_correct(prev, cur):
    assert edu.check_step(prev, cur).startswith("correct"), (prev, cur)


@pytest.mark.parametrize("prev,cur,ok", STEPS)
def test_check_step(prev, cur, ok):
    out = edu.check_step(prev, cur)
    assert out.startswith("correct" if ok else "incorrect"), (prev, cur, out)


@pytest.mark.parametrize("prev,cur,ok", [
    ("3(x + 1)", "3x + 3", True), ("(a + b)^2", "a^2 + 2ab + b^2", True), ("(a + b)^2", "a^2 + b^2", False),
    ("sqrt(12)", "2sqrt(3)", True), ("sqrt(12)", "3sqrt(2)", False), ("1/2 + 1/3", "5/6", True),
    ("1/2 + 1/3", "2/5", False), ("0.1 + 0.2", "0.3", True), ("2^10", "1024", True), ("x/2 + x/2", "x", True),
    ("(x^2 - 1)/(x - 1)", "x + 1", True), ("2xy + xy", "3xy", True), ("√16 + √9", "7", True),
])
def test_check_step_expressions(prev, cur, ok):
    assert edu.check_step(prev, cur).startswith("correct" if ok else "incorrect")


def test_expression_step_states_the_domain_it_holds_on():
    assert edu.check_step("(x^2 - 1)/(x - 1)", "x + 1") == "correct: the step keeps it equivalent (for x ≠ 1)"
    assert edu.check_step("x/x", "1") == "correct: the step keeps it equivalent (for x ≠ 0)"
    assert edu.check_step("2x + 3 = 7", "2x = 4") == "correct: the step keeps it equivalent"  # the trained wording


def test_solution_sets_respect_the_domain():
    x = sp.Symbol("x")
    assert mx.solutions(mx.equation("x/x = 1"), x) == sp.Complement(sp.S.Reals, sp.FiniteSet(0))
    assert mx.solutions(mx.equation("sqrt(x) = x - 2"), x) == sp.FiniteSet(4)  # 1 is extraneous
    assert mx.solutions(mx.equation("x = x"), x) == sp.S.Reals


@pytest.mark.parametrize("text", ["__import__('os').system('ls')", "x.__class__", "open('f')", "lambda: 1",
                                  "[1, 2]", "x if y else z", "2 ** 99999", "sqrt(x, 2)", "sqrt x", "hello + 1",
                                  "x^100 = 1", "1/0", "2 3", "sqrt(-4)^2", "(-8)^(1/3)"])
def test_rejects_what_is_not_school_maths(text):
    with pytest.raises(mx.MathError):
        mx.equation(text) if "=" in text else mx.expression(text)
    with pytest.raises(ToolException):
        edu.check_step(text, "1" if "=" not in text else "x = 1")


def test_parser_builds_sympy_without_sympify():
    """User text reaches sympy only as a whitelisted tree converted node by node: the modules never name
    sympy's string parsers or Python's eval."""
    import ast
    import inspect

    for mod in (mx, answers):
        tree = ast.parse(inspect.getsource(mod))
        names = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)} | \
                {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute)}
        assert not names & {"sympify", "parse_expr", "eval", "exec", "parse_latex"}, mod.__name__
        called = {getattr(n.func, "attr", getattr(n.func, "id", None)) for n in ast.walk(tree) if isinstance(n, ast.Call)}
        assert "S" not in called, mod.__name__  # sp.S("...") would parse a string; sp.S.Reals is fine
    expr, domain = mx.expression("2x(x + 1)/√y")
    x, y = sp.symbols("x y")
    assert sp.simplify(expr - 2 * x * (x + 1) / sp.sqrt(y)) == 0
    assert domain.nonnegative == [y] and domain.nonzero == [sp.sqrt(y)]
    assert mx._python_source("2xy + 3(x+1)√x") == "2 * x * y + 3 * ( x + 1 ) * sqrt ( x )"


@pytest.mark.parametrize("answer,reference,correct,note", [
    ("0.5", "1/2", True, ""), ("6/8", "3/4", True, ""), ("x = 3", "3", True, ""), ("1 1/2", "3/2", True, ""),
    ("1.5", "1 1/2", True, ""), ("50 mm", "5 cm", True, ""), ("0.05 m", "5 cm", True, ""),
    ("1.5 hours", "90 min", True, ""), ("3.6 km/h", "1 m/s", True, ""), ("12 cm²", "12 cm^2", True, ""),
    ("5", "5 cm", False, "right number, but give the unit (cm)"), ("5 kg", "5 cm", False,
                                                                   "the unit does not measure the same thing as the question asks"),
    ("6 cm", "5 cm", False, ""), ("25%", "0.25", True, ""), ("1/4", "25%", True, ""), ("$4.50", "$4.5", True, ""),
    ("0.33", "1/3", True, "rounded to 2 decimal places"), ("1.414", "sqrt(2)", True, "rounded to 3 decimal places"),
    ("0.3", "1/3", False, ""), ("0.13", "0.125", False, ""), ("x = ±2", "x = -2 or x = 2", True, ""),
    ("x = 2", "x = ±2", False, ""), ("2x + 1", "1 + 2x", True, ""), ("3", "2", False, ""),
])
def test_answers_compare(answer, reference, correct, note):
    assert answers.compare(answer, reference) == answers.Match(correct, note)


def test_grade_answer_feedback_names_rounding_and_missing_units():
    out = json.loads(edu.grade_answer("0.67", "2/3"))
    assert out["correct"] and out["feedback"] == ["final answer correct (rounded to 2 decimal places)"]
    out = json.loads(edu.grade_answer("12", "12 cm", answer_points=2))
    assert not out["correct"] and out["score"] == 0 and "give the unit (cm)" in out["feedback"][0]
    assert json.loads(edu.grade_answer("Paris", "paris."))["correct"]  # words: same text ignoring case


def test_hints_still_work_on_sympy():
    assert mx.linear_solution("3x - 5 = 10") == ("x", 3.0, -15.0, 5.0)
    assert mx.linear_solution("x^2 = 4") is None and mx.linear_solution("1/x = 2") is None
    assert mx.evaluate(mx.parse("2x + sqrt(9)"), {"x": 1.5}) == 6.0


def test_hard_equations_answer_within_the_tool_timeout_or_say_so():
    reg = edu.registry()  # check_step runs under its 5 s tool timeout
    assert reg.run("check_step", {"previous": "(x+1)^12 = (x-1)^12 + 3", "current": "x = 1"}).startswith("incorrect")
    assert reg.run("check_step", {"previous": "x^12 + 3x^11 - 7x^5 + 2 = 0",
                                  "current": "x^12 + 3x^11 - 7x^5 = -2"}).startswith("correct")
    with pytest.raises(ToolException, match="cannot decide"):
        edu.check_step("x^x = 4", "x = 2")


def test_letters_are_algebra_before_units():
    assert answers.compare("t*3", "3t") == answers.Match(True)  # t is a variable here, not tonnes
    assert answers.compare("500 cm", "5 m") == answers.Match(True)
