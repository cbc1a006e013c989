"""Local copies of public datasets -> ossforge dataset rows (DESIGN §3).

Nothing is downloaded: point a loader at the file you have. JSON lines and parquet go through
``datasets`` (via :mod:`ossforge.finetune.data`); a whole-file JSON document (PubMedQA's
``ori_pqal.json``, a BFCL file saved as one array) is read as one object.

| format   | input                                                             | row                                   |
|----------|-------------------------------------------------------------------|---------------------------------------|
| medmcqa  | ``question, opa..opd, cop`` (+ ``exp``); HF parquet cop 0-3, JSON 1-4 | multiple choice, ``metadata.answer``  |
| pubmedqa | ``ori_pqal.json`` {id: {QUESTION, CONTEXTS, final_decision, LONG_ANSWER}} or HF rows | yes/no/maybe choice  |
| gsm8k    | ``question, answer`` (``... #### 72``)                            | reasoning + final number              |
| bfcl     | ``question, function`` (+ a ``possible_answer`` file: ``ground_truth``) | tool call(s), ``metadata.ground_truth`` |

Rows keep what evaluation needs in ``metadata`` (ignored by training): ``kind`` (``choice``,
``exact`` or ``tool_call``), ``answer`` / ``choices`` or ``ground_truth``, ``source``, ``id``.
Bad input raises :class:`UserError` as ``FILE:LINE: reason``.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

from ossforge.errors import UserError
from ossforge.finetune.domains.common import assistant, call, row, write_jsonl

LETTERS = "ABCD"
MCQ_SYSTEM = "Answer the multiple-choice question. Give the letter of the correct option."
YESNO_SYSTEM = "Answer the biomedical research question with yes, no or maybe, from the abstract."
GSM8K_SYSTEM = "Solve the maths word problem. Reason step by step, then give the final number."
BFCL_SYSTEM = "Call the functions needed to answer the user's request. If none applies, say so without calling one."


# ----------------------------------------------------------------------------- reading


def _records(path: str | Path) -> Iterator[tuple[str, Any]]:
    """(``FILE:LINE`` or ``FILE:KEY``, record) for every record of a local file or folder."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: file not found")
    if path.is_file() and path.suffix in (".json", ".jsonl"):
        text = path.read_text(encoding="utf-8")
        try:
            whole = json.loads(text)
        except json.JSONDecodeError:
            whole = None  # JSON lines
        if isinstance(whole, dict) and whole and all(isinstance(v, dict) for v in whole.values()):
            if not ({"question", "QUESTION", "messages"} & set(whole)):  # keyed by id (PubMedQA)
                for key, value in whole.items():
                    yield f"{path}:{key}", {"id": key, **value}
                return
        if isinstance(whole, list):
            for i, value in enumerate(whole, start=1):
                yield f"{path}:{i}", value
            return
    from ossforge.finetune.data import _iter_raw

    for r in _iter_raw(path):
        if r.error:
            raise UserError(f"{r.where}: {r.error}")
        yield r.where, r.data


def _need(where: str, rec: Any, *keys: str) -> list:
    if not isinstance(rec, dict):
        raise UserError(f"{where}: expected a JSON object, got {type(rec).__name__}")
    missing = [k for k in keys if rec.get(k) in (None, "")]
    if missing:
        raise UserError(f"{where}: missing field {missing[0]!r}")
    return [rec[k] for k in keys]


def _take(records: Iterator, limit: Optional[int]) -> Iterator:
    for i, item in enumerate(records):
        if limit is not None and i >= limit:
            return
        yield item


# ----------------------------------------------------------------------------- MedMCQA


def load_medmcqa(path: str | Path, limit: Optional[int] = None, cop_base: Optional[int] = None,
                 effort: str = "low") -> list[dict]:
    """MedMCQA questions as multiple-choice rows. ``cop`` is 0-based in the HF parquet release and
    1-based in the original JSON release (``cop_base`` overrides the guess from the file type)."""
    base = cop_base if cop_base is not None else (0 if Path(path).suffix == ".parquet" or Path(path).is_dir() else 1)
    rows = []
    for where, rec in _take(_records(path), limit):
        question, *options = _need(where, rec, "question", "opa", "opb", "opc", "opd")
        cop = rec.get("cop")
        if isinstance(cop, str) and cop.strip().isdigit():
            cop = int(cop)
        if not isinstance(cop, int) or not 0 <= cop - base < 4:
            raise UserError(f"{where}: cop: expected {base}..{base + 3}, got {cop!r}")
        letter = LETTERS[cop - base]
        lines = [str(question).strip(), *(f"{L}. {str(o).strip()}" for L, o in zip(LETTERS, options))]
        explanation = str(rec.get("exp") or "").strip()
        thinking = (explanation[:600] if explanation else f"The correct option is {letter}.")
        rows.append({**row(MCQ_SYSTEM, [{"role": "user", "content": "\n".join(lines)},
                                        assistant(thinking, content=f"Answer: {letter}")], [], effort),
                     "metadata": {"kind": "choice", "answer": letter, "choices": list(LETTERS),
                                  "source": "medmcqa", "id": str(rec.get("id", where))}})
    return rows


# ----------------------------------------------------------------------------- PubMedQA


def load_pubmedqa(path: str | Path, limit: Optional[int] = None, effort: str = "low") -> list[dict]:
    """PubMedQA (PQA-L ``ori_pqal.json`` or HF ``pubmed_qa`` rows) as yes/no/maybe rows."""
    rows = []
    for where, rec in _take(_records(path), limit):
        if isinstance(rec, dict) and "QUESTION" in rec:  # original release
            question, contexts, decision = _need(where, rec, "QUESTION", "CONTEXTS", "final_decision")
            long_answer = rec.get("LONG_ANSWER") or ""
        else:  # Hugging Face rows: context is {"contexts": [...], ...}
            question, context, decision = _need(where, rec, "question", "context", "final_decision")
            contexts = context.get("contexts", []) if isinstance(context, dict) else context
            long_answer = rec.get("long_answer") or ""
        decision = str(decision).strip().lower()
        if decision not in ("yes", "no", "maybe"):
            raise UserError(f"{where}: final_decision: expected yes, no or maybe, got {decision!r}")
        if isinstance(contexts, str):
            contexts = [contexts]
        abstract = " ".join(str(c).strip() for c in contexts)
        user = f"Abstract: {abstract}\nQuestion: {str(question).strip()}"
        rows.append({**row(YESNO_SYSTEM, [{"role": "user", "content": user},
                                         assistant(str(long_answer).strip() or f"The abstract supports {decision}.",
                                                   content=f"Answer: {decision}")], [], effort),
                     "metadata": {"kind": "choice", "answer": decision, "choices": ["yes", "no", "maybe"],
                                  "source": "pubmedqa", "id": str(rec.get("id") or rec.get("pubid") or where)}})
    return rows


# ----------------------------------------------------------------------------- GSM8K

_CALC = re.compile(r"<<[^>]*>>")


def load_gsm8k(path: str | Path, limit: Optional[int] = None, effort: str = "medium") -> list[dict]:
    """GSM8K problems: the worked solution becomes the reasoning, the ``#### N`` line the answer.
    Calculator annotations (``<<48/2=24>>``) are removed from the reasoning."""
    rows = []
    for where, rec in _take(_records(path), limit):
        question, answer = _need(where, rec, "question", "answer")
        if "####" not in answer:
            raise UserError(f"{where}: answer: no '#### <number>' final line")
        work, final = answer.rsplit("####", 1)
        final = final.strip().replace(",", "")
        thinking = _CALC.sub("", work).strip() or "Compute the answer."
        rows.append({**row(GSM8K_SYSTEM, [{"role": "user", "content": str(question).strip()},
                                         assistant(thinking, content=f"The answer is {final}.")], [], effort),
                     "metadata": {"kind": "exact", "answer": final, "source": "gsm8k", "id": str(rec.get("id", where))}})
    return rows


# ----------------------------------------------------------------------------- BFCL

# BFCL's Python-flavoured type names -> JSON schema, as BFCL itself maps them for OpenAI-style models
# (``bfcl_eval.constants.type_mappings.GORILLA_TO_OPENAPI``): ``any`` is presented as a string there too.
_BFCL_TYPES = {"dict": "object", "float": "number", "tuple": "array", "any": "string", "integer": "integer",
               "string": "string", "boolean": "boolean", "array": "array", "number": "number", "object": "object"}
_SAFE = re.compile(r"[^A-Za-z0-9_]")
# Keywords whose value is one schema / a list of schemas / a {name: schema} map. Everything else
# (descriptions, defaults, enums, required lists, unknown keys) is data and is copied untouched.
_SUBSCHEMA = ("items", "additionalProperties", "not")
_SUBSCHEMA_LISTS = ("anyOf", "oneOf", "allOf", "prefixItems")
_SUBSCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions")


def safe_tool_name(name: str) -> str:
    """BFCL names such as ``math.factorial`` as harmony recipients allow (``math_factorial``)."""
    return _SAFE.sub("_", name)


def _schema(node: Any) -> Any:
    """One BFCL parameter schema -> JSON schema: only the ``type`` *keyword* is rewritten.

    The walk follows the schema's structure, so a parameter that happens to be called ``type``,
    ``items`` or ``format`` (BFCL has ~300 of them) is a name inside ``properties`` and survives
    with its own schema converted.
    """
    if not isinstance(node, dict):
        return node
    out = {}
    for key, value in node.items():
        if key == "type":
            out[key] = _BFCL_TYPES.get(value, value) if isinstance(value, str) else value
        elif key in _SUBSCHEMA and isinstance(value, (dict, list)):
            out[key] = [_schema(v) for v in value] if isinstance(value, list) else _schema(value)
        elif key in _SUBSCHEMA_LISTS and isinstance(value, list):
            out[key] = [_schema(v) for v in value]
        elif key in _SUBSCHEMA_MAPS and isinstance(value, dict):
            out[key] = {name: _schema(v) for name, v in value.items()}
        else:
            out[key] = value
    return out


def _bfcl_question(where: str, q: Any) -> list[dict]:
    """User/system turns of a BFCL question (v1: a string; v3: [[{role, content}, ...]])."""
    if isinstance(q, str):
        return [{"role": "user", "content": q}]
    if isinstance(q, list) and q and isinstance(q[0], list):
        q = q[0]  # first turn of a (possibly multi-turn) entry
    if isinstance(q, list) and all(isinstance(m, dict) and "role" in m for m in q):
        return [{"role": m["role"], "content": str(m.get("content", ""))} for m in q]
    raise UserError(f"{where}: question: expected a string or a list of chat turns")


def _first_allowed(values: Any, schema: Optional[dict] = None) -> tuple[bool, Any]:
    """(present, value) for one BFCL ground-truth parameter: a list of allowed values, ``""`` =
    may be omitted. The answer of a ``dict`` parameter (or of each item of an array of dicts) is
    itself ``{key: [allowed...]}``, one level deep as BFCL's checker reads it: it becomes a concrete
    object (``{"adults": [2]}`` -> ``{"adults": 2}``)."""
    if not isinstance(values, list):
        return True, values
    kind = (schema or {}).get("type")
    items = ((schema or {}).get("items") or {}).get("type") if isinstance((schema or {}).get("items"), dict) else None
    for v in values:
        if v == "":
            continue
        if kind == "dict" and isinstance(v, dict):
            return True, _concrete_dict(v)
        if kind in ("array", "tuple") and items == "dict" and isinstance(v, list):
            return True, [_concrete_dict(x) if isinstance(x, dict) else x for x in v]
        return True, v
    return False, None


def _concrete_dict(allowed: dict) -> dict:
    out = {}
    for key, options in allowed.items():
        present, value = _first_allowed(options)
        if present:
            out[key] = value
    return out


_CATEGORY = re.compile(r"_\d+(?:-\d+)*$")


def bfcl_category(ident: str) -> str:
    """BFCL's test category from an entry id: ``live_simple_3-2-1`` -> ``live_simple``."""
    return _CATEGORY.sub("", ident)


def load_bfcl(path: str | Path, answers: Optional[str | Path] = None, limit: Optional[int] = None,
              effort: str = "low") -> list[dict]:
    """BFCL function-calling entries (``question``, ``function``) with their ground truth from a
    ``possible_answer`` file (joined on ``id``). Entries without ground truth (the irrelevance
    categories) become "no call" rows. The training target is the first allowed value of each
    parameter; evaluation accepts any allowed value (``metadata.ground_truth``).

    ``metadata`` also keeps the entry's ``category`` and its original ``functions`` (BFCL's own types:
    ``float``, ``tuple``, ``any``, ``dict``), which BFCL-exact scoring needs.
    """
    truth: dict[str, Any] = {}
    if answers is not None:
        for where, rec in _records(answers):
            ident, gt = _need(where, rec, "id", "ground_truth")
            truth[str(ident)] = gt
    rows = []
    for where, rec in _take(_records(path), limit):
        question, functions = _need(where, rec, "question", "function")
        ident = str(rec.get("id", where))
        category = bfcl_category(ident)
        functions = functions if isinstance(functions, list) else [functions]
        tools, names, by_name = [], {}, {}
        for f in functions:
            if not isinstance(f, dict) or not f.get("name"):
                raise UserError(f"{where}: function: every function needs a name")
            names[f["name"]] = safe_tool_name(f["name"])
            by_name[f["name"]] = f
            tools.append({"name": names[f["name"]], "description": str(f.get("description", "")),
                          "parameters": _schema(f.get("parameters") or {"type": "object", "properties": {}})})
        msgs = _bfcl_question(where, question)
        gt = truth.get(ident)
        if gt is None and answers is not None and "irrelevance" not in category:
            raise UserError(f"{where}: no ground truth for id {ident!r} in {answers}")
        if gt:
            calls, ground = [], []
            for entry in gt:
                if not isinstance(entry, dict) or len(entry) != 1:
                    raise UserError(f"{where}: ground_truth: each entry must be {{function: {{param: [values]}}}}")
                (fname, params), = entry.items()
                if fname not in names:
                    raise UserError(f"{where}: ground_truth names unknown function {fname!r}")
                props = (by_name[fname].get("parameters") or {}).get("properties") or {}
                args = {}
                for p, values in params.items():
                    if p not in props and isinstance(values, list) and "" in values:
                        continue  # an optional answer the function does not declare (a BFCL data slip)
                    present, value = _first_allowed(values, props.get(p))
                    if present:
                        args[p] = value
                calls.append(call(names[fname], args))
                ground.append({names[fname]: params})
            reply = assistant("Pick the matching function and copy the arguments from the request.", tool_calls=calls)
            meta = {"kind": "tool_call", "ground_truth": ground}
        else:
            reply = assistant("None of the functions fits this request.", content="None of the available functions can do that.")
            meta = {"kind": "tool_call", "ground_truth": []}
        system = [m for m in msgs if m["role"] == "system"]
        rest = [m for m in msgs if m["role"] != "system"]
        instructions = "\n\n".join([BFCL_SYSTEM, *(m["content"] for m in system)])
        rows.append({**row(instructions, [*rest, reply], tools, effort),
                     "metadata": {**meta, "source": "bfcl", "id": ident, "category": category,
                                  "functions": functions}})
    return rows


LOADERS: dict[str, Callable[..., list[dict]]] = {
    "medmcqa": load_medmcqa, "pubmedqa": load_pubmedqa, "gsm8k": load_gsm8k, "bfcl": load_bfcl,
}


def convert(fmt: str, path: str | Path, out: str | Path, limit: Optional[int] = None, **kwargs) -> int:
    """Convert a local public-format file to a dataset JSONL; returns the row count."""
    if fmt not in LOADERS:
        raise UserError(f"{fmt}: unknown format (choose from {', '.join(LOADERS)})")
    rows = LOADERS[fmt](path, limit=limit, **kwargs)
    if not rows:
        raise UserError(f"{path}: no records")
    return write_jsonl(out, rows)
