"""Medicine domain: weight-based dosing with a ``dose_calc`` calculator tool.

Every row is short (well under 512 rendered tokens) and uses one fixed system prompt, so a tiny
model trained on CPU can learn the pattern: read the dosing rule and weight, think briefly, call
``dose_calc`` with arguments copied from the prompt (or recalled from the formulary below), read
the result, answer. A few rows ask a question that needs no calculation ("no call"), some ask for
two drugs at once (parallel calls) and some follow up with a second weight (multi-turn).

Held-out rows use different prompt templates, weights divisible by 3 (training weights never
are) and five drugs that never appear in training (their rule is stated in the prompt).

Doses are illustrative figures from public paediatric references (see data/medicine/DATA_CARD.md);
this is training data for a demo model, not clinical guidance.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Optional

from ossforge.finetune.domains.common import EFFORTS, assistant, call, fmt, num, row, tool_result

SYSTEM = "You are a clinical dosing assistant. Use dose_calc for weight-based doses. Answer briefly."

def _agent_tools() -> list[dict]:
    """``dose_calc`` exactly as the medicine agent serves it (ossforge.agents), so a model tuned
    on these rows sees the same tool declaration when it runs as an agent."""
    from ossforge.agents.domains.medicine import registry

    return [t for t in registry().as_dataset_tools() if t["name"] == "dose_calc"]


TOOLS = _agent_tools()
DOSE_CALC_TOOL = TOOLS[0]


def dose_calc(mg_per_kg: float, weight_kg: float, max_dose_mg: Optional[float] = None) -> str:
    """The agent's tool itself: the exact text the dataset's tool messages contain."""
    from ossforge.agents.domains.medicine import dose_calc as agent_dose_calc

    return agent_dose_calc(mg_per_kg, weight_kg, max_dose_mg)


@dataclass(frozen=True)
class Drug:
    name: str
    mg_per_kg: float
    max_mg: Optional[float]
    use: str


# Per-dose rules (mg/kg, max single dose) as commonly cited in public paediatric references; the
# drugs that the agent's table (agents/data/drugs.csv) also lists use its figures.
FORMULARY = [
    Drug("paracetamol", 15, 1000, "fever"),
    Drug("ibuprofen", 10, 400, "pain"),
    Drug("amoxicillin", 45, 1000, "otitis media"),
    Drug("azithromycin", 10, 500, "pneumonia"),
    Drug("dexamethasone", 0.6, 16, "croup"),
    Drug("prednisolone", 1, 40, "asthma"),
    Drug("ceftriaxone", 50, 2000, "sepsis"),
    Drug("cefazolin", 30, 2000, "surgical prophylaxis"),
    Drug("adrenaline", 0.01, 0.5, "anaphylaxis"),
    Drug("lorazepam", 0.1, 4, "status epilepticus"),
    Drug("levetiracetam", 60, 4500, "status epilepticus"),
    Drug("morphine", 0.1, 10, "severe pain"),
    Drug("ondansetron", 0.15, 4, "vomiting"),
    Drug("omeprazole", 1, 40, "reflux"),
    Drug("naloxone", 0.1, 2, "opioid overdose"),
    Drug("tranexamic acid", 15, 1000, "trauma bleeding"),
    Drug("gentamicin", 7, None, "sepsis"),
    Drug("vancomycin", 15, None, "MRSA infection"),
    Drug("aciclovir", 10, None, "encephalitis"),
]
# Only in the held-out split, always with the rule stated in the prompt.
HELDOUT_ONLY = [
    Drug("clindamycin", 10, 600, "cellulitis"),
    Drug("metronidazole", 7.5, 500, "abdominal infection"),
    Drug("hydrocortisone", 2, 100, "adrenal crisis"),
    Drug("ketorolac", 0.5, 30, "pain"),
    Drug("ampicillin", 50, 2000, "meningitis"),
]

# Prompt templates. {rule} is "25 mg/kg, max 1000 mg" or "7 mg/kg".
TRAIN_STATED = [
    "{drug} {rule}. Weight {w} kg. What dose?",
    "Order: {drug} {rule}. Patient weighs {w} kg. Calculate the dose.",
    "How much {drug} for a {w} kg child at {rule}?",
    "Dose {drug} at {rule} for a {w} kg patient.",
]
TRAIN_RECALL = [
    "A {w} kg child needs {drug} for {use}. What single dose?",
    "{drug} for {use}, weight {w} kg. Dose?",
]
TRAIN_FOLLOWUP = ["And for a {w} kg child?", "Same order, weight {w} kg?"]
TRAIN_PARALLEL = ["Weight {w} kg. Doses of {drug} {rule} and {drug2} {rule2}?"]
TRAIN_NOCALL = [
    ("What is the maximum single dose of {drug}?", "max"),
    ("What is the per-kg dose of {drug} for {use}?", "rule"),
]

HELDOUT_STATED = [
    "Patient weight: {w} kg. Prescribed {drug} at {rule}. Dose please.",
    "Please work out {drug} ({rule}) for someone weighing {w} kg.",
]
HELDOUT_RECALL = ["What single dose of {drug} should a {w} kg child get for {use}?"]
HELDOUT_FOLLOWUP = ["Now the patient is {w} kg. What then?"]
HELDOUT_PARALLEL = ["For {w} kg: {drug} {rule}, plus {drug2} {rule2}. Both doses?"]
HELDOUT_NOCALL = [
    ("Remind me of the usual {drug} dose per kilogram.", "rule"),
    ("Is there a cap on a single dose of {drug}?", "max"),
]


def _rule(d: Drug, mg_per_kg: float, max_mg: Optional[float]) -> str:
    return f"{fmt(mg_per_kg)} mg/kg" + (f", max {fmt(max_mg)} mg" if max_mg is not None else "")


def _args(mg_per_kg: float, w: int, max_mg: Optional[float]) -> dict:
    a = {"mg_per_kg": num(mg_per_kg), "weight_kg": w}
    if max_mg is not None:
        a["max_dose_mg"] = num(max_mg)
    return a


def _cap(name: str, d: Drug, w: int) -> tuple[str, str]:
    """Final-answer sentence and the tool result for one drug and weight."""
    result = dose_calc(d.mg_per_kg, w, d.max_mg)
    raw = fmt(d.mg_per_kg * w)
    if d.max_mg is not None and d.mg_per_kg * w > d.max_mg:
        answer = f"{name}: {fmt(d.max_mg)} mg (the maximum)."
    else:
        answer = f"{name}: {raw} mg per dose."
    return answer, result


def _think_before(d: Drug, w: int, effort: str, recalled: bool) -> str:
    rule = _rule(d, d.mg_per_kg, d.max_mg)
    source = f"Formulary for {d.use}: {d.name} {rule}." if recalled else f"Rule given: {d.name} {rule}."
    if effort == "low":
        return f"{source} Weight {w} kg."
    if effort == "medium":
        return f"{source} Weight {w} kg. Use dose_calc."
    return f"{source} Weight {w} kg. Use dose_calc; it applies the cap."


def _think_after(d: Drug, w: int, result: str, effort: str) -> str:
    if effort == "low":
        return "Dose returned."
    raw = d.mg_per_kg * w
    capped = d.max_mg is not None and raw > d.max_mg
    check = f"{fmt(d.mg_per_kg)} x {w} = {fmt(raw)} mg" + (", capped." if capped else ".")
    if effort == "medium":
        return check
    return f"Check: {check} Dose is per administration."


def _cap_first(s: str) -> str:
    return s[:1].upper() + s[1:]


def _single(rng: random.Random, d: Drug, w: int, template: str, effort: str, recalled: bool) -> list[dict]:
    user = template.format(drug=d.name, rule=_rule(d, d.mg_per_kg, d.max_mg), w=w, use=d.use)
    answer, result = _cap(_cap_first(d.name), d, w)
    return [
        {"role": "user", "content": _cap_first(user)},
        assistant(_think_before(d, w, effort, recalled), tool_calls=[call("dose_calc", _args(d.mg_per_kg, w, d.max_mg))]),
        tool_result("dose_calc", result),
        assistant(_think_after(d, w, result, effort), content=answer),
    ]


def _parallel(d: Drug, d2: Drug, w: int, template: str, effort: str) -> list[dict]:
    user = template.format(drug=d.name, rule=_rule(d, d.mg_per_kg, d.max_mg), drug2=d2.name,
                           rule2=_rule(d2, d2.mg_per_kg, d2.max_mg), w=w)
    a1, r1 = _cap(_cap_first(d.name), d, w)
    a2, r2 = _cap(_cap_first(d2.name), d2, w)
    think = f"Two doses for {w} kg: {d.name} and {d2.name}. One dose_calc call each."
    if effort == "high":
        think += " The calls are independent."
    return [
        {"role": "user", "content": _cap_first(user)},
        assistant(think, tool_calls=[call("dose_calc", _args(d.mg_per_kg, w, d.max_mg)),
                                     call("dose_calc", _args(d2.mg_per_kg, w, d2.max_mg))]),
        tool_result("dose_calc", r1),
        tool_result("dose_calc", r2),
        assistant("Both doses returned.", content=f"{a1} {a2}"),
    ]


def _nocall(d: Drug, template: str, kind: str, effort: str) -> list[dict]:
    user = template.format(drug=d.name, use=d.use)
    name = _cap_first(d.name)
    if kind == "max":
        answer = (f"{name}: at most {fmt(d.max_mg)} mg per dose ({fmt(d.mg_per_kg)} mg/kg)." if d.max_mg is not None
                  else f"{name} has no fixed single-dose cap here; dose {fmt(d.mg_per_kg)} mg/kg and follow levels.")
    else:
        answer = f"{name} for {d.use}: {_rule(d, d.mg_per_kg, d.max_mg)} per dose."
    think = "No weight given, so no calculation. Answer from the formulary."
    if effort == "high":
        think += f" {d.name}: {_rule(d, d.mg_per_kg, d.max_mg)}."
    return [{"role": "user", "content": _cap_first(user)}, assistant(think, content=answer)]


def _weight(rng: random.Random, heldout: bool) -> int:
    """Training weights are never multiples of 3; held-out weights always are."""
    while True:
        w = rng.randint(4, 95)
        if (w % 3 == 0) == heldout:
            return w


def _kinds(rng: random.Random, n: int, shares: dict[str, float]) -> list[str]:
    counts = {k: int(round(n * s)) for k, s in shares.items()}
    first = next(iter(shares))
    counts[first] += n - sum(counts.values())
    kinds = [k for k, c in counts.items() for _ in range(c)]
    rng.shuffle(kinds)
    return kinds


def generate(split: str, n: int, seed: int = 0) -> list[dict]:
    """``n`` rows of the ``train`` or ``heldout`` split, deterministic for a given seed."""
    heldout = split == "heldout"
    rng = random.Random(f"medicine/{split}/{seed}")
    stated, recall = (HELDOUT_STATED, HELDOUT_RECALL) if heldout else (TRAIN_STATED, TRAIN_RECALL)
    followup, parallel = (HELDOUT_FOLLOWUP, HELDOUT_PARALLEL) if heldout else (TRAIN_FOLLOWUP, TRAIN_PARALLEL)
    nocall = HELDOUT_NOCALL if heldout else TRAIN_NOCALL
    stated_drugs = FORMULARY + HELDOUT_ONLY if heldout else FORMULARY
    shares = {"stated": 0.46, "recall": 0.2, "followup": 0.12, "parallel": 0.08, "nocall": 0.14}
    rows = []
    for kind in _kinds(rng, n, shares):
        effort = rng.choice(EFFORTS)
        w = _weight(rng, heldout)
        if kind == "stated":
            msgs = _single(rng, rng.choice(stated_drugs), w, rng.choice(stated), effort, recalled=False)
        elif kind == "recall":
            msgs = _single(rng, rng.choice(FORMULARY), w, rng.choice(recall), effort, recalled=True)
        elif kind == "followup":
            d = rng.choice(stated_drugs)
            msgs = _single(rng, d, w, rng.choice(stated), "low", recalled=False)  # short: stays < 512 tokens
            w2 = _weight(rng, heldout)
            while w2 == w:
                w2 = _weight(rng, heldout)
            answer, result = _cap(_cap_first(d.name), d, w2)
            msgs += [
                {"role": "user", "content": rng.choice(followup).format(w=w2)},
                assistant(f"Same rule, {d.name} {_rule(d, d.mg_per_kg, d.max_mg)}. Weight {w2} kg.",
                          tool_calls=[call("dose_calc", _args(d.mg_per_kg, w2, d.max_mg))]),
                tool_result("dose_calc", result),
                assistant(_think_after(d, w2, result, "low"), content=answer),
            ]
        elif kind == "parallel":
            d, d2 = rng.sample(stated_drugs, 2)
            msgs = _parallel(d, d2, w, rng.choice(parallel), effort)
        else:
            template, what = rng.choice(nocall)
            msgs = _nocall(rng.choice(FORMULARY), template, what, effort)
        rows.append(row(SYSTEM, msgs, TOOLS, effort))
    return rows
