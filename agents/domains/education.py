"""Education assistant: step checker, a hint ladder that never gives the answer, a rubric grader."""

from __future__ import annotations

import ast
import json
import re
from typing import Optional

from langchain_core.tools import StructuredTool, ToolException
from pydantic import BaseModel, Field

from ossforge.agents.domains import answers
from ossforge.agents.domains import mathexpr as mx
from ossforge.agents.tools import ToolRegistry

DISCLAIMER = ""  # no standing disclaimer: tutoring, not advice

SYSTEM_PROMPT = (
    "You are a patient maths tutor. Help the student find the answer themselves: check each step "
    "they write with check_step, offer hints with give_hint (start at level 1 and go up only when "
    "they are still stuck), and grade final answers with grade_answer. Never state the final answer "
    "before the student has given it."
)


class CheckStepArgs(BaseModel):
    previous: str = Field(description="the expression or equation before the step, e.g. '2x + 3 = 7'")
    current: str = Field(description="the student's next line, e.g. '2x = 4'")


def check_step(previous: str, current: str) -> str:
    """Whether one arithmetic/algebra step keeps the expression or equation equivalent."""
    # (the docstring is the tool description the model was trained on; keep it one line)
    # Equations: the same real solutions within the domain of each line (no division by zero, no
    # square root of a negative), so a step that loses or gains a solution is wrong. Expressions:
    # the difference simplifies to 0 (see mathexpr).
    try:
        if mx.is_equation(previous) != mx.is_equation(current):
            return "incorrect: a step must keep an equation an equation (or an expression an expression)"
        if mx.is_equation(previous):
            ok, note = mx.equivalent_equations(previous, current), ""
        else:
            ok = mx.same_value(previous, current)
            note = mx.domain_note(previous, current) if ok else ""
    except mx.MathError as exc:
        raise ToolException(str(exc)) from None
    if ok is None:
        raise ToolException("cannot decide this step automatically (the equation is too hard to solve exactly)")
    if ok:
        return f"correct: the step keeps it equivalent{note}"
    return "incorrect: the new line is not equivalent to the previous one; recheck the operation applied to both sides"


class GiveHintArgs(BaseModel):
    problem: str = Field(description="the problem, e.g. '3x - 5 = 10' or '37 * 4'")
    level: int = Field(default=1, ge=1, le=3, description="1 = gentle nudge, 2 = next step, 3 = worked first step")


def _reveals(hint: str, answer: str) -> bool:
    return re.search(rf"(?<![\d.]){re.escape(answer)}(?![\d.])", hint) is not None


def _linear_hints(problem: str, sol) -> list[str]:
    v, a, _, _ = sol
    lhs, rhs = (mx.parse(side) for side in problem.split("="))
    with_var = [t for t in (lhs, rhs) if v in mx.variables(t)]
    if len(with_var) == 2:
        first = f"Collect the {v} terms on one side and the plain numbers on the other"
    else:
        c = mx.evaluate(with_var[0], {v: 0.0})
        a = mx.evaluate(with_var[0], {v: 1.0}) - c
        first = (f"Move the constant away from {v}: {'subtract' if c > 0 else 'add'} {mx.fmt(abs(c))} on both sides"
                 if not mx._close(c, 0.0) else f"Divide both sides by the number in front of {v}")
    return [
        f"Goal: get {v} on its own. Look at what is done to {v} and undo it in reverse order.",
        f"{first}. Whatever you do to one side, do to the other.",
        f"After collecting terms you should have {'' if mx._close(a, 1.0) else mx.fmt(a)}{v} = something. Work out that number, then finish with one more step.",
    ]


def _arithmetic_hints(problem: str) -> list[str]:
    tree = mx.parse(problem)
    if isinstance(tree, ast.BinOp) and isinstance(tree.op, ast.Mult) and all(
            isinstance(t, ast.Constant) for t in (tree.left, tree.right)):
        a, b = int(tree.left.value), int(tree.right.value)
        if a < b:
            a, b = b, a
        tens, ones = a - a % 10, a % 10
        return [
            "Estimate first: round one number to a nearby ten and multiply. Your answer should be close to that.",
            f"Split {a} into {tens} + {ones} and multiply each part by {b}.",
            f"{tens} × {b} = {tens * b}. Now work out {ones} × {b} and add the two parts.",
        ]
    if isinstance(tree, ast.BinOp) and isinstance(tree.op, (ast.Add, ast.Sub)) and "/" in problem:
        return [
            "Fractions can only be added or subtracted when they have the same denominator.",
            "Find the least common multiple of the denominators and rewrite each fraction with it.",
            "Once the denominators match, combine the numerators and keep the denominator; simplify at the end.",
        ]
    return [
        "Estimate the size of the answer first so you can check yourself at the end.",
        "Do brackets first, then powers, then × and ÷ from left to right, then + and − from left to right.",
        "Write each intermediate result on its own line and check it with the step checker.",
    ]


_GENERIC = [
    "Write down what you know and what you are asked to find.",
    "Turn the words into an equation with one unknown.",
    "Solve the equation one step at a time and check each step.",
]


def give_hint(problem: str, level: int = 1) -> str:
    """A hint at ``level`` (1-3) that moves the student on without giving the final answer."""
    answer = None
    try:
        sol = mx.linear_solution(problem) if "=" in problem else None
        if sol is not None:
            hints, answer = _linear_hints(problem, sol), mx.fmt(sol[3])
        elif "=" not in problem and not mx.variables(mx.parse(problem)):
            hints, answer = _arithmetic_hints(problem), mx.fmt(mx.evaluate(mx.parse(problem), {}))
        else:
            hints = _GENERIC
    except (mx.MathError, ZeroDivisionError, OverflowError):
        hints = _GENERIC
    hint = hints[min(max(level, 1), 3) - 1]
    if answer is not None and _reveals(hint, answer):
        hint = hints[0]  # a hint must never contain the answer
    return f"hint {level}/3: {hint}"


class RubricItem(BaseModel):
    criterion: str = Field(description="what earns the points, e.g. 'shows subtracting 3 from both sides'")
    points: float = Field(gt=0, description="points for this criterion")
    keywords: list[str] = Field(default_factory=list, description="all must appear in the work to award it")


class GradeAnswerArgs(BaseModel):
    answer: str = Field(description="the student's final answer, e.g. 'x = 2' or '148'")
    reference: str = Field(description="the correct answer")
    work: str = Field(default="", description="the student's working, checked against the rubric")
    rubric: Optional[list[RubricItem]] = Field(default=None, description="extra criteria; none = answer only")
    answer_points: float = Field(default=1.0, ge=0, description="points for a correct final answer")


def answers_match(answer: str, reference: str) -> bool:
    """Same value, solutions or quantity (see ``answers.compare``), else same text ignoring case."""
    return _match(answer, reference).correct


def _match(answer: str, reference: str) -> answers.Match:
    try:
        return answers.compare(answer, reference)
    except mx.MathError:
        norm = lambda s: re.sub(r"\s+", " ", s.strip().lower().rstrip("."))  # noqa: E731
        return answers.Match(norm(answer) == norm(reference))


def grade_answer(answer: str, reference: str, work: str = "", rubric: Optional[list] = None,
                 answer_points: float = 1.0) -> str:
    """Score an answer: ``answer_points`` if it matches the reference plus each rubric criterion met."""
    match = _match(answer, reference)
    correct = match.correct
    score, max_score = (answer_points if correct else 0.0), answer_points
    feedback = [f"final answer {'correct' if correct else 'not correct yet'}" + (f" ({match.note})" if match.note else "")]
    text = f"{work}\n{answer}".lower()
    for item in rubric or []:
        item = item if isinstance(item, RubricItem) else RubricItem(**item)
        met = all(k.lower() in text for k in item.keywords)
        max_score += item.points
        score += item.points if met else 0.0
        feedback.append(f"{item.criterion}: {'met' if met else 'not met'}")
    return json.dumps({"correct": correct, "score": score, "max_score": max_score, "feedback": feedback})


def registry() -> ToolRegistry:
    """The education tools (pure functions: low risk, no approval)."""
    reg = ToolRegistry()
    for fn, schema in ((check_step, CheckStepArgs), (give_hint, GiveHintArgs), (grade_answer, GradeAnswerArgs)):
        reg.register(StructuredTool.from_function(fn, args_schema=schema), risk="low", timeout_s=5.0)
    return reg
