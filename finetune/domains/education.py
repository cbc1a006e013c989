"""Education domain: a maths tutor that checks a student's step with the ``check_step`` tool.

The student shows a step (``3 * 12 - 7 = 29`` or ``3x + 5 = 20`` -> ``3x = 15``); the tutor thinks
briefly, calls ``check_step`` with ``previous`` and ``current`` copied from the message, reads the
verdict and replies with feedback. Some rows check two steps at once (parallel calls), some go on
after a wrong step (multi-turn), and some are concept questions answered without a tool ("no
call"). ``check_step`` and its schema are the education agent's own (ossforge.agents), so the
tool results are exactly what the agent would see.

Held-out rows use other word problems, other numbers (factors 13-25 instead of 2-12, denominators
5/10/12 instead of 2/3/4/6/8, equations ``ax - b = c`` instead of ``ax + b = c``) and other
concept questions.
"""

from __future__ import annotations

import ast
import operator
import random
from fractions import Fraction

from ossforge.finetune.domains.common import EFFORTS, assistant, call, row, tool_result

SYSTEM = "You are a patient maths tutor. Use check_step to verify a student's step before replying. Answer briefly."


def _agent_tools() -> list[dict]:
    """``check_step`` exactly as the education agent declares it."""
    from ossforge.agents.domains.education import registry

    return [t for t in registry().as_dataset_tools() if t["name"] == "check_step"]


TOOLS = _agent_tools()


def check_step(previous: str, current: str) -> str:
    """The agent's tool itself: the exact text the dataset's tool messages contain."""
    from ossforge.agents.domains.education import check_step as agent_check_step

    return agent_check_step(previous, current)


_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv}


def evaluate(expression: str) -> Fraction:
    """Exact value of an arithmetic expression (+ - * / and parentheses only)."""

    def ev(node):
        if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
            return _OPS[type(node.op)](ev(node.left), ev(node.right))
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
            return -ev(node.operand)
        if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)) and not isinstance(node.value, bool):
            return Fraction(str(node.value))
        raise ValueError(f"unsupported expression: {expression!r}")

    return ev(ast.parse(expression, mode="eval").body)


def show(value: Fraction) -> str:
    """``12``, ``7/8`` or ``-1/2``."""
    return str(value.numerator) if value.denominator == 1 else f"{value.numerator}/{value.denominator}"


NAMES = ["Ana", "Ben", "Chen", "Dara", "Eli", "Fatima", "Gus", "Hana", "Ivan", "Jo", "Kofi", "Lena"]

# (problem template, expression template, what the step does). Numbers: a, b, c, d (integers),
# p, q, r, s (fraction parts), pct, a0.
TRAIN_PROBLEMS = [
    ("{name} buys {a} packs of {b} stickers and gives away {c}. How many are left?", "{a} * {b} - {c}", "multiplication"),
    ("A ticket costs {a} dollars and a snack {b}. What do {c} tickets and {d} snacks cost?", "{c} * {a} + {d} * {b}", "products"),
    ("{a} apples and {b} pears are shared equally among {c} baskets. How many per basket?", "({a} + {b}) / {c}", "division"),
    ("Add {p}/{q} and {r}/{s}.", "{p}/{q} + {r}/{s}", "common denominator"),
    ("What is {pct}% of {a0}?", "{a0} * {pct} / 100", "percentage"),
]
HELDOUT_PROBLEMS = [
    ("A library has {a} shelves of {b} books; {c} books are on loan. How many are on the shelves?", "{a} * {b} - {c}", "multiplication"),
    ("{name} runs {a} km a day for {b} days, then {c} km more. What is the total?", "{a} * {b} + {c}", "multiplication"),
    ("Find {p}/{q} minus {r}/{s}.", "{p}/{q} - {r}/{s}", "common denominator"),
    ("A {a0} dollar jacket is {pct}% off. How many dollars off?", "{a0} * {pct} / 100", "percentage"),
]
TRAIN_ASK = [
    "Problem: {problem} My work: {expr} = {ans}. Is that right?",
    "{problem} I wrote {expr} = {ans}. Can you check?",
]
HELDOUT_ASK = ["I'm stuck checking this. {problem} I got {expr} = {ans}."]
TRAIN_EQUATION = ["Solving {prev}. Next line: {cur}. Correct?", "I turned {prev} into {cur}. Is that allowed?"]
HELDOUT_EQUATION = ["From {prev} I went to {cur}. Did I do that right?"]
TRAIN_RETRY = ["Oh, so it is {ans}?", "Let me redo it: {ans}?"]
HELDOUT_RETRY = ["Fixed it, I now get {ans}."]
TRAIN_TWO = ["Two steps: {e1} = {a1}, then {e2} = {a2}. Both right?"]
HELDOUT_TWO = ["Are these correct? First {e1} = {a1}; second {e2} = {a2}."]

TRAIN_CONCEPTS = [
    ("What does the denominator of a fraction tell us?", "How many equal parts the whole is split into."),
    ("Why do we need a common denominator to add fractions?", "Only parts of the same size can be added directly."),
    ("What does percent mean?", "Per hundred: 15% means 15 out of every 100."),
    ("Which comes first, multiplication or addition?", "Multiplication, unless parentheses say otherwise."),
    ("What is a prime number?", "A whole number above 1 whose only divisors are 1 and itself."),
    ("What does it mean to simplify a fraction?", "Divide top and bottom by their greatest common factor."),
]
HELDOUT_CONCEPTS = [
    ("What is the numerator of a fraction?", "The top number: how many of the equal parts you have."),
    ("How do I turn a percentage into a decimal?", "Divide by 100: 40% is 0.4."),
    ("What does the word product mean in maths?", "The result of multiplying numbers."),
]


def _numbers(rng: random.Random, heldout: bool) -> dict:
    lo, hi = (13, 25) if heldout else (2, 12)
    dens = (5, 10, 12) if heldout else (2, 3, 4, 6, 8)
    a, b, d = rng.randint(lo, hi), rng.randint(lo, hi), rng.randint(lo, hi)
    c = rng.randint(1, a * b - 1)
    q, s = rng.choice(dens), rng.choice(dens)
    pct = rng.choice((15, 35, 45, 65) if heldout else (10, 20, 25, 50, 75))
    return dict(a=a, b=b, c=c, d=d, p=rng.randint(1, q - 1), q=q, r=rng.randint(1, s - 1), s=s,
                pct=pct, a0=rng.choice((60, 140, 180, 220) if heldout else (20, 40, 80, 120, 200)),
                name=rng.choice(NAMES))


def _problem(rng: random.Random, heldout: bool) -> tuple[str, str, str]:
    problem, expr, step = rng.choice(HELDOUT_PROBLEMS if heldout else TRAIN_PROBLEMS)
    nums = _numbers(rng, heldout)
    if "/ {c}" in expr:  # sharing problems divide evenly: make a + b a multiple of c
        nums["a"] = nums["c"] * rng.randint(1, 6) + (-nums["b"]) % nums["c"]
    return problem.format(**nums), expr.format(**nums), step


def _claim(rng: random.Random, expr: str, correct: bool) -> str:
    value = evaluate(expr)
    if correct:
        return show(value)
    if value.denominator == 1:
        return show(value + rng.choice((-10, -2, -1, 1, 2, 10)))
    return f"{value.numerator + 1}/{value.denominator}"


def _equation(rng: random.Random, heldout: bool, correct: bool) -> tuple[str, str]:
    """A linear equation and the student's next line (subtract/add the constant on both sides)."""
    a, x = rng.randint(2, 9), rng.randint(1, 12)
    b = rng.randint(13, 30) if heldout else rng.randint(1, 12)
    if heldout:  # a x - b = c  ->  a x = c + b
        c = a * x - b
        prev, rhs, wrong = f"{a}x - {b} = {c}", c + b, c - b
    else:  # a x + b = c  ->  a x = c - b
        c = a * x + b
        prev, rhs, wrong = f"{a}x + {b} = {c}", c - b, c + b
    return prev, f"{a}x = {rhs if correct else wrong}"


def _think(prev: str, cur: str, effort: str) -> str:
    if effort == "low":
        return f"Check {prev} -> {cur}."
    if effort == "medium":
        return f"The student goes from {prev} to {cur}. Verify with check_step."
    return f"The student goes from {prev} to {cur}. Verify with check_step first, then give short feedback, not the full solution."


def _feedback(result: str, step: str) -> str:
    if result.startswith("correct"):
        return "Yes, that step is right. Well done."
    return f"Not quite: recheck the {step} step."


def _one_check(prev: str, cur: str, user: str, step: str, effort: str) -> list[dict]:
    result = check_step(prev, cur)
    return [
        {"role": "user", "content": user},
        assistant(_think(prev, cur, effort), tool_calls=[call("check_step", {"previous": prev, "current": cur})]),
        tool_result("check_step", result),
        assistant("Correct step." if result.startswith("correct") else "Wrong step.", content=_feedback(result, step)),
    ]


def generate(split: str, n: int, seed: int = 0) -> list[dict]:
    """``n`` rows of the ``train`` or ``heldout`` split, deterministic for a given seed."""
    heldout = split == "heldout"
    rng = random.Random(f"education/{split}/{seed}")
    shares = [("check", 0.35), ("equation", 0.15), ("retry", 0.15), ("two", 0.15), ("concept", 0.2)]
    kinds = [k for k, s in shares for _ in range(int(round(n * s)))]
    kinds = (kinds + ["check"] * n)[:n]
    rng.shuffle(kinds)
    rows = []
    for kind in kinds:
        effort = rng.choice(EFFORTS)
        if kind == "check":
            problem, expr, step = _problem(rng, heldout)
            ans = _claim(rng, expr, rng.random() < 0.6)
            ask = rng.choice(HELDOUT_ASK if heldout else TRAIN_ASK)
            msgs = _one_check(expr, ans, ask.format(problem=problem, expr=expr, ans=ans), step, effort)
        elif kind == "equation":
            prev, cur = _equation(rng, heldout, rng.random() < 0.6)
            ask = rng.choice(HELDOUT_EQUATION if heldout else TRAIN_EQUATION)
            msgs = _one_check(prev, cur, ask.format(prev=prev, cur=cur), "both-sides", effort)
        elif kind == "retry":
            problem, expr, step = _problem(rng, heldout)
            wrong, right = _claim(rng, expr, False), show(evaluate(expr))
            ask = rng.choice(HELDOUT_ASK if heldout else TRAIN_ASK)
            retry = rng.choice(HELDOUT_RETRY if heldout else TRAIN_RETRY)
            msgs = _one_check(expr, wrong, ask.format(problem=problem, expr=expr, ans=wrong), step, effort)
            msgs += [
                {"role": "user", "content": retry.format(ans=right)},
                assistant(f"New claim {expr} = {right}. Check again.",
                          tool_calls=[call("check_step", {"previous": expr, "current": right})]),
                tool_result("check_step", check_step(expr, right)),
                assistant("Correct step.", content=f"Yes, {right} is right. Nice correction."),
            ]
        elif kind == "two":
            _, e1, _ = _problem(rng, heldout)
            _, e2, _ = _problem(rng, heldout)
            a1, a2 = _claim(rng, e1, rng.random() < 0.6), _claim(rng, e2, rng.random() < 0.6)
            r1, r2 = check_step(e1, a1), check_step(e2, a2)
            verdict = lambda r: "right" if r.startswith("correct") else "not right yet"
            msgs = [
                {"role": "user", "content": rng.choice(HELDOUT_TWO if heldout else TRAIN_TWO).format(e1=e1, a1=a1, e2=e2, a2=a2)},
                assistant("Two independent steps. One check_step call each.",
                          tool_calls=[call("check_step", {"previous": e1, "current": a1}),
                                      call("check_step", {"previous": e2, "current": a2})]),
                tool_result("check_step", r1),
                tool_result("check_step", r2),
                assistant("Both checked.", content=f"First step: {verdict(r1)}. Second step: {verdict(r2)}."),
            ]
        else:
            question, answer = rng.choice(HELDOUT_CONCEPTS if heldout else TRAIN_CONCEPTS)
            think = "A concept question: no step to check, answer directly."
            msgs = [{"role": "user", "content": question}, assistant(think, content=answer)]
        rows.append(row(SYSTEM, msgs, TOOLS, effort))
    return rows
