"""Score a model, and a LoRA adapter on it, on the config's eval set.

    ossforge eval CONFIG [--adapter DIR] [--json] [--limit N] [--efforts row|all|low,high]

Every eval row yields cases: each user turn of a tool-using row (the next assistant message's calls
are the answer; none = a "no call" case), and the question of a multiple-choice / exact-answer row
(``metadata.kind`` from the public-format loaders). The model writes its reply greedily through the
agents layer (``TransformersBackend``) and ``parse_completion`` turns it into the ``AIMessage`` an
agent would receive; that message is what gets scored:

- ``tool_call_accuracy``: BFCL-style AST check of the calls (see ``domains/scoring.py``); a "no
  call" case passes only with a final answer and no call;
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
    p.add_argument("--json", action="store_true", help="print only the JSON (no table, no progress bar)")


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
                expected = (meta["ground_truth"] if n == 0 and "ground_truth" in meta
                            else expected_from_calls(reply.get("tool_calls") or []))
                out.append(Case(where, msgs[:i + 1], tools, effort, "tool_call", expected=expected))
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


def score(case: Case, reply: Reply) -> dict:
    from ossforge.finetune.domains.scoring import check_calls, choice_answer, exact_answer_ok

    if case.kind == "tool_call":
        if not case.expected:
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


def evaluate_model(backend, cases: list[Case], max_new_tokens: int, label: str, quiet: bool) -> dict:
    from tqdm.auto import tqdm

    results = []
    for case in tqdm(cases, desc=f"eval {label}", unit="case", disable=quiet, file=sys.stderr, dynamic_ncols=True):
        reply = generate_reply(backend, case, max_new_tokens)
        results.append((case, reply, score(case, reply)))
    metrics = summarize(results)
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


def format_table(report: dict) -> str:
    models = [m for m in ("base", "tuned") if m in report]
    rows = [("tool_call_accuracy", _pct), ("call_accuracy", _pct), ("no_call_accuracy", _pct),
            ("well_formed_calls", _pct), ("accuracy", _pct), ("eval_loss", _num),
            ("output_tokens", _num), ("reasoning_tokens", _num)]
    head = f"{'metric':<22}" + "".join(f"{m:>12}" for m in models) + (f"{'delta':>12}" if len(models) == 2 else "")
    lines = [f"ossforge eval: {report['data']} ({report['cases']} cases, efforts: {report['efforts']})", head]
    for key, fmt in rows:
        vals = [report[m].get(key) for m in models]
        if all(v is None for v in vals):
            continue
        line = f"{key:<22}" + "".join(f"{fmt(v):>12}" for v in vals)
        if len(models) == 2 and None not in vals:
            d = vals[1] - vals[0]
            line += f"{(f'{100 * d:+.1f} pts' if fmt is _pct else f'{d:+.4g}'):>12}"
        lines.append(line)
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
    from ossforge.model.checkpoint import load_folder, load_model

    from ossforge.finetune.run_dir import ensure_recorded_base

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
                return load_folder(folder, dtype=dtype, device=device), str(folder)
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
    adapter = _adapter_dir(args, config)
    if args.no_base and adapter is None:
        raise UserError(f"{args.config}: --no-base: no adapter (pass --adapter DIR)")

    rows = check_or_raise(data, drop_analysis=config.data.drop_analysis)[: args.limit]
    cases = [c for r in rows for c in row_cases(r.data, r.where, efforts)]
    examples, _ = examples_from_rendered([r.rendered for r in rows], config.training.seq_len)
    if not cases:
        raise UserError(f"{data}: no scorable rows (need tools or metadata.kind choice/exact)")

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = resolve_dtype(config.model.dtype, device.type)
    model, base_source = _load_base(config, adapter, dtype, str(device))
    model.config.use_cache = True
    report: dict[str, Any] = {"config": str(args.config), "data": str(data), "cases": len(cases),
                              "efforts": args.efforts, "base_model": base_source,
                              "adapter": str(adapter) if adapter else None}
    if not args.no_base:
        backend = TransformersBackend(model, device=str(device))
        report["base"] = evaluate_model(backend, cases, args.max_new_tokens, "base", args.json)
        report["base"]["eval_loss"] = eval_loss(model, examples, config, device)
    if adapter is not None:
        from peft import PeftModel

        from ossforge.model.fused_moe import unfuse_moe

        unfuse_moe(model)  # peft wraps the stock layers; the backend fuses again
        tuned = PeftModel.from_pretrained(model, str(adapter))
        backend = TransformersBackend(tuned, device=str(device))
        report["tuned"] = evaluate_model(backend, cases, args.max_new_tokens, "tuned", args.json)
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
        print(f"plot: {out_dir / 'eval.png'}", file=sys.stderr)
    print(json.dumps(report, indent=1))
    return 0
