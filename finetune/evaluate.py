"""Score a model, and a LoRA adapter on it, on the config's eval set.

    ossforge eval CONFIG [--adapter DIR] [--json] [--limit N] [--efforts row|all|low,high]

Every eval row yields cases: each user turn of a tool-using row (the next assistant message's calls
are the answer; none = a "no call" case), and the question of a multiple-choice / exact-answer row
(``metadata.kind`` from the public-format loaders). The model writes its reply greedily through the
agents layer (``TransformersBackend``) and ``parse_completion`` turns it into the ``AIMessage`` an
agent would receive; that message is what gets scored:

- ``tool_call_accuracy``: rows converted from BFCL are scored exactly as BFCL's AST checker does
  (``domains/bfcl_checker.py``), the rest by ossforge's schema-strict checks (``domains/scoring.py``;
  a "no call" case passes only with a final answer and no call); ``--scoring`` picks one for all;
- per BFCL category, and the leaderboard's non-live / live / irrelevance columns, on BFCL rows;
- ``accuracy``: multiple-choice (``Answer: X``) and exact-number answers;
- ``eval_loss``: token-weighted loss on the eval rows, as training computes it;
- the same per reasoning effort, with output and reasoning tokens spent.

Inside an assistant turn harmony allows only ``<|start|>assistant`` after a message's ``<|end|>``;
the backend enforces that (:class:`ossforge.agents.backends.HarmonyContinuation`). Training labels never cover those two
tokens (DESIGN §3), so a model tuned from a random init could not write them itself; a pretrained
gpt-oss writes them anyway.

Parallel calls: harmony ends a turn at ``<|call|>``; as training renders parallel calls, the model
is then asked whether another assistant call follows (``<|start|>`` -> ``assistant``) or a tool
result would (anything else), up to 4 calls.

The base is ``<run>/base`` beside the adapter when it exists, else the config's model
(``model.path``, or the preset built from ``model.init_seed``, exactly as training built it).
JSON goes to stdout, a table to stderr; ``eval.json`` and ``eval.png`` go to the run folder.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from ossforge.errors import UserError

EFFORTS = ("low", "medium", "high")
MAX_CALLS = 4


def add_arguments(p):
    p.add_argument("config", help="YAML config (its data.eval is scored, its model is the base)")
    p.add_argument("--adapter", help="peft adapter folder (default: <output_dir>/adapter when it exists)")
    p.add_argument("--no-adapter", action="store_true", help="score only the base model")
    p.add_argument("--no-base", action="store_true", help="score only the adapter")
    p.add_argument("--data", help="eval set to score instead of the config's data.eval")
    p.add_argument("--set", action="append", default=[], dest="overrides", metavar="KEY=VALUE",
                   help="override a config key (repeatable)")
    p.add_argument("--limit", type=int, help="score only the first N rows")
    p.add_argument("--efforts", default="row",
                   help="'row': each case at its row's reasoning effort (default); 'all' or a list "
                        "such as low,high: every case at each effort")
    p.add_argument("--max-new-tokens", type=int, default=160, help="generation budget per case (default 160)")
    p.add_argument("--out", help="folder for eval.json / eval.png (default: the adapter's run folder or output_dir)")
    p.add_argument("--scoring", choices=SCORING, default="auto",
                   help="how tool calls are judged: 'bfcl' = exactly as BFCL's own AST checker; 'schema' = "
                        "stricter checks against each tool's JSON schema (enums, required); 'auto' (default) = "
                        "bfcl for rows converted from BFCL, schema for the rest")
    p.add_argument("--json", action="store_true", help="print only the JSON (no table, no progress bar)")
    from ossforge.agents.chat_cli import add_server_arguments

    add_server_arguments(p)  # --server URL --server-model NAME --api-key KEY ...
    p.add_argument("--server-base-model", metavar="NAME",
                   help="with --server: also score this served model as the base (e.g. vLLM's --served-model-name "
                        "when it serves the base plus --lora-modules med=ADAPTER and --server-model is med)")


# ----------------------------------------------------------------------------- cases


@dataclass
class Case:
    where: str  # FILE:LINE of the row
    messages: list[dict]  # the prompt: everything before the reply
    tools: list[dict]
    effort: str
    kind: str  # tool_call | choice | exact
    expected: list = field(default_factory=list)  # tool_call: ground truth
    answer: Optional[str] = None  # choice / exact
    choices: list = field(default_factory=list)
    category: Optional[str] = None  # BFCL test category (metadata.category), for per-category figures
    functions: Optional[list] = None  # BFCL's original function descriptions: BFCL-exact scoring


def row_cases(row: dict, where: str, efforts: list[str] | None) -> list[Case]:
    """The scored cases of one dataset row (empty for rows with nothing to score)."""
    from ossforge.finetune.domains.scoring import expected_from_calls

    meta = row.get("metadata") or {}
    msgs, tools = row["messages"], row.get("tools") or []
    row_effort = (row.get("reasoning_effort") or "medium").lower()
    kind = meta.get("kind") or ("tool_call" if tools else None)
    out: list[Case] = []
    for effort in efforts or [row_effort]:
        if kind in ("choice", "exact"):
            first_user = next(i for i, m in enumerate(msgs) if m["role"] == "user")
            out.append(Case(where, msgs[:first_user + 1], tools, effort, kind,
                            answer=str(meta.get("answer")), choices=list(meta.get("choices") or [])))
        elif kind == "tool_call":
            turns = [i for i, m in enumerate(msgs) if m["role"] == "user"]
            for n, i in enumerate(turns):
                reply = next((m for m in msgs[i + 1:] if m["role"] == "assistant"), None)
                if reply is None:
                    continue
                first = n == 0 and "ground_truth" in meta
                expected = meta["ground_truth"] if first else expected_from_calls(reply.get("tool_calls") or [])
                bfcl = first and meta.get("source") == "bfcl" and isinstance(meta.get("functions"), list)
                out.append(Case(where, msgs[:i + 1], tools, effort, "tool_call", expected=expected,
                                category=meta.get("category") if bfcl else None,
                                functions=meta["functions"] if bfcl else None))
    return out


def parse_efforts(text: str) -> list[str] | None:
    if text == "row":
        return None
    efforts = list(EFFORTS) if text == "all" else [e.strip().lower() for e in text.split(",") if e.strip()]
    bad = [e for e in efforts if e not in EFFORTS]
    if bad or not efforts:
        raise UserError(f"--efforts: {bad[0] if bad else text!r} is not row, all or a list of low/medium/high")
    return efforts


# ----------------------------------------------------------------------------- generation


@dataclass
class Reply:
    calls: list[dict]
    invalid: list[dict]
    content: str
    output_tokens: int
    reasoning_tokens: int


def generate_tokens(backend, prompt: list[int], max_tokens: int) -> list[int]:
    """Greedy completion of ``prompt`` up to ``<|call|>``/``<|return|>``. A local
    ``TransformersBackend`` writes ``<|start|>assistant`` after each ``<|end|>`` itself
    (:class:`ossforge.agents.backends.HarmonyContinuation`)."""
    return list(backend.generate(prompt, max_tokens=max_tokens, temperature=0.0))


def render_prompt(messages: list[dict], tools: list[dict] | None, effort: str | None) -> list[int]:
    """Harmony prompt ids of a dataset conversation, ending in ``<|start|>assistant``."""
    import openai_harmony as oh

    from ossforge.finetune.harmony import build_conversation
    from ossforge.model import tokenizer as tok

    convo = build_conversation(messages, tools or None, effort)
    return [int(t) for t in tok.harmony_encoding().render_conversation_for_completion(convo, oh.Role.ASSISTANT)]


def generate_reply(backend, case: Case, max_new_tokens: int) -> Reply:
    """The model's reply to a case, parsed by the agents layer exactly as an agent receives it."""
    from ossforge.agents.parsing import parse_completion
    from ossforge.finetune.harmony import ASSISTANT
    from ossforge.model import tokenizer as tok

    prompt = render_prompt(case.messages, case.tools, case.effort)
    names = [t["name"] for t in case.tools]
    reply = Reply([], [], "", 0, 0)
    budget = max_new_tokens
    for _ in range(MAX_CALLS):
        out = generate_tokens(backend, prompt, budget)
        budget -= len(out)
        msg = parse_completion(out, names, input_tokens=len(prompt))
        reply.calls += [{"name": c["name"], "args": c["args"]} for c in msg.tool_calls]
        reply.invalid += [dict(c) for c in msg.invalid_tool_calls]
        reply.content += msg.content if isinstance(msg.content, str) else ""
        reply.output_tokens += len(out)
        reply.reasoning_tokens += msg.usage_metadata["output_token_details"]["reasoning"]
        if msg.response_metadata.get("finish_reason") != "tool_calls" or budget <= 0:
            break
        prompt = prompt + out + [tok.START]
        if generate_tokens(backend, prompt, 1)[:1] != [ASSISTANT]:
            break  # the model expects a tool result next: no further call in this turn
        prompt.append(ASSISTANT)
    return reply


SCORING = ("auto", "bfcl", "schema")


def score(case: Case, reply: Reply, scoring: str = "auto") -> dict:
    """Score one reply. Tool calls: ``bfcl`` = BFCL's AST checker rules (``domains/bfcl_checker.py``),
    for rows converted from BFCL; ``schema`` = ossforge's stricter checks (enums, the schema's
    required parameters, JSON types; ``domains/scoring.py``), right for the project's own domain
    sets; ``auto`` = ``bfcl`` for BFCL-sourced rows, ``schema`` for the rest."""
    from ossforge.finetune.domains.bfcl_checker import check_calls_bfcl
    from ossforge.finetune.domains.scoring import check_calls, choice_answer, exact_answer_ok

    if case.kind == "tool_call":
        bfcl = case.functions is not None and scoring in ("auto", "bfcl")
        if bfcl:  # BFCL: an undecodable call is no call (passes irrelevance, fails the rest)
            why = check_calls_bfcl(reply.calls, case.expected, case.functions, case.category or "simple")
            if why is None and case.expected and reply.invalid:
                why = f"invalid tool call: {reply.invalid[0].get('error')}"
        elif not case.expected:
            why = ("called a tool" if reply.calls or reply.invalid else
                   None if reply.content.strip() else "no final answer")
        elif reply.invalid:
            why = f"invalid tool call: {reply.invalid[0].get('error')}"
        else:
            why = check_calls(reply.calls, case.expected, case.tools)
        well_formed = bool(reply.calls) and not reply.invalid
        return {"ok": why is None, "why": why, "well_formed": well_formed, "no_call": not case.expected}
    if case.kind == "choice":
        pick = choice_answer(reply.content, case.choices)
        return {"ok": pick == case.answer, "why": None if pick == case.answer else f"picked {pick!r}"}
    ok = exact_answer_ok(reply.content, case.answer or "")
    return {"ok": ok, "why": None if ok else "wrong number"}


# ----------------------------------------------------------------------------- metrics


def _mean(xs: list[float]) -> Optional[float]:
    return round(sum(xs) / len(xs), 4) if xs else None


def summarize(results: list[tuple[Case, Reply, dict]]) -> dict:
    tool = [(c, r, s) for c, r, s in results if c.kind == "tool_call"]
    calls = [s for c, r, s in tool if not s["no_call"]]
    nocalls = [s for c, r, s in tool if s["no_call"]]
    answers = [s for c, r, s in results if c.kind != "tool_call"]
    return {
        "cases": len(results),
        "tool_call_accuracy": _mean([float(s["ok"]) for _, _, s in tool]),
        "tool_call_cases": len(tool),
        "call_accuracy": _mean([float(s["ok"]) for s in calls]),
        "no_call_accuracy": _mean([float(s["ok"]) for s in nocalls]),
        "well_formed_calls": _mean([float(s["well_formed"]) for s in calls]),
        "accuracy": _mean([float(s["ok"]) for s in answers]),
        "answer_cases": len(answers),
        "output_tokens": _mean([r.output_tokens for _, r, _ in results]),
        "reasoning_tokens": _mean([r.reasoning_tokens for _, r, _ in results]),
    }


def _got(reply: Reply) -> str:
    """A short view of what the model answered, for the failure list."""
    if reply.calls:
        return "; ".join(f"{c['name']}({json.dumps(c['args'], ensure_ascii=False)})" for c in reply.calls)[:160]
    if reply.invalid:
        return f"invalid call {reply.invalid[0].get('name')!r}: {str(reply.invalid[0].get('args'))[:100]}"
    return reply.content[:160]


NON_LIVE = ("simple_python", "multiple", "parallel", "parallel_multiple")
LIVE = ("live_simple", "live_multiple", "live_parallel", "live_parallel_multiple")
IRRELEVANCE = ("irrelevance", "live_irrelevance")


def by_category(results: list[tuple[Case, Reply, dict]]) -> dict:
    """Accuracy per BFCL category, and the leaderboard's column figures over the categories present:
    non-live = unweighted mean of its categories, live = case-weighted mean, irrelevance = unweighted
    mean of irrelevance and live_irrelevance (as BFCL's ``eval_runner_helper`` computes them; BFCL
    counts a category that was not run as 0, here it is left out and ``categories`` says what ran)."""
    cats: dict[str, list[float]] = {}
    for case, _, s in results:
        if case.category:
            cats.setdefault(case.category, []).append(float(s["ok"]))
    if not cats:
        return {}
    per = {c: {"accuracy": round(sum(v) / len(v), 4), "cases": len(v)} for c, v in sorted(cats.items())}
    groups = {}
    for group, names, weighted in (("non_live", NON_LIVE, False), ("live", LIVE, True), ("irrelevance", IRRELEVANCE, False)):
        present = [per[c] for c in names if c in per]
        if present:
            acc = (sum(p["accuracy"] * p["cases"] for p in present) / sum(p["cases"] for p in present) if weighted
                   else sum(p["accuracy"] for p in present) / len(present))
            groups[group] = {"accuracy": round(acc, 4), "categories": [c for c in names if c in per]}
    return {"categories": per, "groups": groups}


def evaluate_model(backend, cases: list[Case], max_new_tokens: int, label: str, quiet: bool,
                   scoring: str = "auto") -> dict:
    from tqdm.auto import tqdm

    results = []
    for case in tqdm(cases, desc=f"eval {label}", unit="case", disable=quiet, file=sys.stderr, dynamic_ncols=True):
        reply = generate_reply(backend, case, max_new_tokens)
        results.append((case, reply, score(case, reply, scoring)))
    metrics = summarize(results)
    bfcl = by_category(results)
    if bfcl:
        metrics["bfcl"] = bfcl
    metrics["by_effort"] = {e: summarize([x for x in results if x[0].effort == e])
                            for e in EFFORTS if any(x[0].effort == e for x in results)}
    metrics["failures"] = [{"where": c.where, "effort": c.effort, "why": s["why"], "got": _got(r)}
                           for c, r, s in results if not s["ok"]][:20]
    return metrics


def eval_loss(model, examples: list[dict], config, device) -> Optional[float]:
    from ossforge.finetune.trainer import evaluate_loss

    if not examples:
        return None
    return round(evaluate_loss(model, examples, config.training.micro_batch_size, device), 6)


# ----------------------------------------------------------------------------- output


def _pct(x) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def _num(x) -> str:
    return "-" if x is None else f"{x:.4g}"


RANDOM_INIT_NOTE = ("base is a random-init preset: judge the call format (well_formed_calls, no_call_accuracy); "
                    "argument accuracy is a real-weights figure")


def _line(label: str, vals: list, fmt) -> str:
    line = f"{label:<22}" + "".join(f"{fmt(v):>12}" for v in vals)
    if len(vals) == 2 and None not in vals:
        d = vals[1] - vals[0]
        line += f"{(f'{100 * d:+.1f} pts' if fmt is _pct else f'{d:+.4g}'):>12}"
    return line


def format_table(report: dict) -> str:
    models = [m for m in ("base", "tuned") if m in report]
    calls = [("tool_call_accuracy", _pct), ("call_accuracy", _pct)]
    form = [("well_formed_calls", _pct), ("no_call_accuracy", _pct)]
    # A random-init base cannot copy arguments: the format-level figures are the ones to read first.
    rows = (form + calls if report.get("random_init_base") else calls + form) + [
        ("accuracy", _pct), ("eval_loss", _num), ("output_tokens", _num), ("reasoning_tokens", _num)]
    head = f"{'metric':<22}" + "".join(f"{m:>12}" for m in models) + (f"{'delta':>12}" if len(models) == 2 else "")
    lines = [f"ossforge eval: {report['data']} ({report['cases']} cases, efforts: {report['efforts']}, "
             f"tool calls scored: {report.get('scoring', 'auto')})", head]
    for key, fmt in rows:
        vals = [report[m].get(key) for m in models]
        if not all(v is None for v in vals):
            lines.append(_line(key, vals, fmt))
    bfcl = [report[m].get("bfcl") or {} for m in models]
    if any(bfcl):
        lines.append("BFCL (accuracy per category; leaderboard columns over the categories run)")
        names = sorted({c for b in bfcl for c in b.get("categories", {})})
        for c in names:
            vals = [b.get("categories", {}).get(c, {}).get("accuracy") for b in bfcl]
            n = next(b["categories"][c]["cases"] for b in bfcl if c in b.get("categories", {}))
            lines.append(_line(f"  {c} ({n})", vals, _pct))
        for g in ("non_live", "live", "irrelevance"):
            vals = [b.get("groups", {}).get(g, {}).get("accuracy") for b in bfcl]
            if not all(v is None for v in vals):
                lines.append(_line(f"  {g.replace('_', '-')}", vals, _pct))
    for effort in EFFORTS:
        per = [report[m]["by_effort"].get(effort) for m in models]
        if all(p is None for p in per):
            continue
        cells = []
        for p in per:
            acc = p and (p["tool_call_accuracy"] if p["tool_call_accuracy"] is not None else p["accuracy"])
            cells.append("-" if p is None else f"{_pct(acc)} {p['output_tokens']:.0f}t")
        lines.append(f"{'effort ' + effort:<22}" + "".join(f"{c:>12}" for c in cells))
    return "\n".join(lines)


def _accuracy(per: dict) -> float:
    """Percent right: tool-call accuracy when the set has tool calls, else answer accuracy."""
    acc = per.get("tool_call_accuracy") if per.get("tool_call_accuracy") is not None else per.get("accuracy")
    return 100 * (acc or 0)


def plot(report: dict, path: Path) -> Path:
    """Accuracy and tokens spent per reasoning effort, base beside tuned."""
    from ossforge.finetune.report import _pyplot, save_figure

    plt = _pyplot()

    models = [m for m in ("base", "tuned") if m in report]
    efforts = [e for e in EFFORTS if any(e in report[m]["by_effort"] for m in models)]
    panels = [("accuracy (%)", _accuracy), ("output tokens per case", lambda p: p.get("output_tokens") or 0)]
    if any(report[m].get("well_formed_calls") is not None for m in models):
        panels.insert(1, ("well-formed tool calls (%)", lambda p: 100 * (p.get("well_formed_calls") or 0)))
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.6))
    width = 0.8 / max(1, len(models))
    for ax, (title, value) in zip(axes, panels):
        for k, m in enumerate(models):
            per = [report[m]["by_effort"].get(e, {}) for e in efforts]
            xs = [i + (k - (len(models) - 1) / 2) * width for i in range(len(efforts))]
            ax.bar(xs, [value(p) for p in per], width, label=m)
        ax.set_xticks(range(len(efforts)), efforts)
        ax.set_xlabel("reasoning effort")
        ax.set_title(title)
        if "%" in title:
            ax.set_ylim(0, 100)
        ax.legend()
    fig.suptitle(f"ossforge eval: {Path(report['data']).name}")
    fig.tight_layout()
    return save_figure(fig, path)


# ----------------------------------------------------------------------------- command


def _adapter_dir(args, config) -> Optional[Path]:
    if args.no_adapter:
        return None
    if args.adapter:
        adapter = Path(args.adapter)
        if not (adapter / "adapter_config.json").is_file():
            raise UserError(f"{adapter}: --adapter: adapter_config.json not found (not a peft adapter folder)")
        return adapter
    default = Path(config.output_dir) / "adapter"
    return default if (default / "adapter_config.json").is_file() else None


def _load_base(config, adapter: Optional[Path], dtype, device):
    """The base the adapter was trained on: ``<run>/base`` beside it, else the adapter's local
    ``base_model_name_or_path``, else the config's model."""
    from ossforge.finetune.run_dir import ensure_recorded_base
    from ossforge.model.checkpoint import folder_expert_format, load_folder, load_model

    ensure_recorded_base(adapter.parent if adapter else Path(config.output_dir))  # a recorded large preset base
    candidates = [adapter.parent / "base"] if adapter else [Path(config.output_dir) / "base"]
    if adapter is not None:
        try:
            recorded = json.loads((adapter / "adapter_config.json").read_text()).get("base_model_name_or_path")
        except (OSError, json.JSONDecodeError):
            recorded = None
        if recorded:
            candidates.append(Path(recorded))
    if config.model.preset or adapter is not None:
        for folder in candidates:
            if (folder / "config.json").is_file():
                fmt = folder_expert_format(config.model.expert_format, folder, device)
                return load_folder(folder, dtype=dtype, device=device, expert_format=fmt), str(folder)
    source = config.model.path or f"preset {config.model.preset} (init_seed {config.model.init_seed})"
    return load_model(config.model, dtype=dtype, device=device), source


def run(args) -> int:
    import torch
    from transformers.utils import logging as hf_logging

    from ossforge.agents.backends import TransformersBackend
    from ossforge.finetune.config import load_config
    from ossforge.finetune.data import check_or_raise, examples_from_rendered
    from ossforge.model.checkpoint import resolve_dtype

    hf_logging.disable_progress_bar()
    config = load_config(args.config, args.overrides)
    data = args.data or config.data.eval
    if not data:
        raise UserError(f"{args.config}: data.eval: not set (add an eval set or pass --data FILE)")
    if args.no_base and args.no_adapter:
        raise UserError("--no-base and --no-adapter: nothing left to score")
    if args.limit is not None and args.limit <= 0:
        raise UserError(f"--limit: must be > 0, got {args.limit}")
    if args.max_new_tokens <= 0:
        raise UserError(f"--max-new-tokens: must be > 0, got {args.max_new_tokens}")
    efforts = parse_efforts(args.efforts)
    adapter = None if args.server else _adapter_dir(args, config)
    if args.no_base and adapter is None and not args.server:
        raise UserError(f"{args.config}: --no-base: no adapter (pass --adapter DIR)")

    rows = check_or_raise(data, drop_analysis=config.data.drop_analysis)[: args.limit]
    cases = [c for r in rows for c in row_cases(r.data, r.where, efforts)]
    examples, _ = examples_from_rendered([r.rendered for r in rows], config.training.seq_len)
    if not cases:
        raise UserError(f"{data}: no scorable rows (need tools or metadata.kind choice/exact)")

    if args.server:
        return _run_through_server(args, config, data, cases)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = resolve_dtype(config.model.dtype, device.type)
    model, base_source = _load_base(config, adapter, dtype, str(device))
    model.config.use_cache = True
    report: dict[str, Any] = {"config": str(args.config), "data": str(data), "cases": len(cases),
                              "efforts": args.efforts, "base_model": base_source,
                              "adapter": str(adapter) if adapter else None, "scoring": args.scoring,
                              "random_init_base": bool(config.model.preset)}
    if not args.no_base:
        backend = TransformersBackend(model, device=str(device))
        report["base"] = evaluate_model(backend, cases, args.max_new_tokens, "base", args.json, args.scoring)
        report["base"]["eval_loss"] = eval_loss(model, examples, config, device)
    if adapter is not None:
        from peft import PeftModel

        from ossforge.model.fused_moe import unfuse_moe

        unfuse_moe(model)  # peft wraps the stock layers; the backend fuses again
        tuned = PeftModel.from_pretrained(model, str(adapter))
        backend = TransformersBackend(tuned, device=str(device))
        report["tuned"] = evaluate_model(backend, cases, args.max_new_tokens, "tuned", args.json, args.scoring)
        report["tuned"]["eval_loss"] = eval_loss(tuned, examples, config, device)
    if "base" in report and "tuned" in report:
        report["delta_points"] = {k: round(100 * (report["tuned"][k] - report["base"][k]), 1)
                                  for k in ("tool_call_accuracy", "call_accuracy", "no_call_accuracy",
                                            "well_formed_calls", "accuracy")
                                  if report["tuned"][k] is not None and report["base"][k] is not None}

    out_dir = Path(args.out) if args.out else (adapter.parent if adapter else Path(config.output_dir))
    from ossforge import atomic

    report["plot"] = str(out_dir / "eval.png")
    plot(report, out_dir / "eval.png")
    atomic.write_text(out_dir / "eval.json", json.dumps(report, indent=1) + "\n")
    if not args.json:
        print(format_table(report), file=sys.stderr)
        if report["random_init_base"]:
            print(f"note: {RANDOM_INIT_NOTE}", file=sys.stderr)
        print(f"plot: {out_dir / 'eval.png'}", file=sys.stderr)
    print(json.dumps(report, indent=1))
    return 0


def _run_through_server(args, config, data, cases) -> int:
    """Score models served by an OpenAI-compatible server (vLLM): ``--server-model`` as "tuned" and,
    with ``--server-base-model``, that one as "base". Nothing is loaded here, so a 120b adapter can
    be scored from any machine that reaches the server. eval_loss needs the model's logits, so it is
    not reported on this path."""
    import copy

    from ossforge import atomic
    from ossforge.agents.backends import BackendError
    from ossforge.agents.chat_cli import server_backend

    report: dict[str, Any] = {"config": str(args.config), "data": str(data), "cases": len(cases),
                              "efforts": args.efforts, "server": args.server,
                              "base_model": args.server_base_model, "adapter": None,
                              "tuned_model": args.server_model}
    served = [("tuned", args.server_model)]
    if args.server_base_model and not args.no_base:
        served.insert(0, ("base", args.server_base_model))
    for label, name in served:
        named = copy.copy(args)
        named.server_model = name
        try:
            report[label] = evaluate_model(server_backend(named), cases, args.max_new_tokens, label, args.json)
        except BackendError as exc:  # one line naming the server, status and message
            raise UserError(str(exc)) from None
        report[label]["eval_loss"] = None
    if "base" in report:
        report["delta_points"] = {k: round(100 * (report["tuned"][k] - report["base"][k]), 1)
                                  for k in ("tool_call_accuracy", "call_accuracy", "no_call_accuracy",
                                            "well_formed_calls", "accuracy")
                                  if report["tuned"][k] is not None and report["base"][k] is not None}
    out_dir = Path(args.out) if args.out else Path(config.output_dir)
    report["plot"] = str(out_dir / "eval.png")
    plot(report, out_dir / "eval.png")
    atomic.write_text(out_dir / "eval.json", json.dumps(report, indent=1) + "\n")
    if not args.json:
        print(format_table(report), file=sys.stderr)
        print(f"plot: {out_dir / 'eval.png'}", file=sys.stderr)
    print(json.dumps(report, indent=1))
    return 0
