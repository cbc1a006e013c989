"""Show what a trained run does on a held-out prompt.

Loads RUN_DIR's base model and adapter (stock transformers + peft), renders the first user turn of a
held-out conversation with openai-harmony, and greedily generates the assistant's reply with and
without the adapter, through the agents layer's ``TransformersBackend`` (which writes
``<|start|>assistant`` after each ``<|end|>``). The harmony output is printed as tokens
(``<|channel|>`` ...) and parsed back with ``parse_completion``, as an agent would receive it, to tell
whether it holds a well-formed tool call; calls are checked against the reference with the same
BFCL-style rules as ``ossforge eval``. ``--score N`` counts well-formed tool calls of both models
over N held-out prompts.

example:
  ossforge demo runs/quickstart
  ossforge demo runs/quickstart --index 3 --score 20
"""

from __future__ import annotations

import argparse
import json
import textwrap
from dataclasses import dataclass
from pathlib import Path

from ossforge.errors import UserError


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", metavar="RUN_DIR", help="a training run's output_dir (e.g. runs/quickstart)")
    p.add_argument("--data", default=None, metavar="FILE", help="held-out JSONL (default: the run's data.eval)")
    p.add_argument("--index", type=int, default=0, metavar="I", help="which held-out conversation to show (0-based)")
    p.add_argument("--score", type=int, default=5, metavar="N",
                   help="also count well-formed tool calls, tuned vs base, on the first N held-out prompts (0: skip)")
    p.add_argument("--max-new-tokens", type=int, default=128, metavar="T",
                   help="longest reply to generate, in tokens")


@dataclass
class Prompt:
    where: str
    messages: list[dict]  # the conversation up to the first assistant reply
    tools: list[dict]
    effort: str | None
    reference: list[tuple[str, dict]]  # the reference reply's tool calls: (name, arguments)
    expected: list[dict]  # the same as ground truth for domains.scoring.check_calls


@dataclass
class Reply:
    tokens: list[int]
    text: str  # harmony tokens written out
    calls: list[tuple[str, object]]  # parsed tool calls: (name, arguments or None when not JSON)
    addressed: bool  # a harmony message addressed to a known tool (functions.NAME)
    well_formed: bool  # a call to a known tool with a JSON object as arguments
    matches: bool  # the calls match the reference calls (domains.scoring.check_calls)


def held_out_prompts(path: str) -> list[Prompt]:
    """Every held-out row that has an assistant reply, cut before that reply."""
    from ossforge.finetune.data import load_rows
    from ossforge.finetune.domains.scoring import expected_from_calls
    from ossforge.finetune.harmony import call_name_and_args

    prompts = []
    for line, row in enumerate(load_rows(path), start=1):
        messages = row.get("messages") or []
        first = next((i for i, m in enumerate(messages) if m.get("role") == "assistant"), None)
        if not first:
            continue
        tool_calls = messages[first].get("tool_calls") or []
        reference = []
        for call in tool_calls:
            name, args = call_name_and_args(call)
            reference.append((name, json.loads(args)))
        prompts.append(Prompt(f"{path}:{line}", messages[:first], row.get("tools") or [], row.get("reasoning_effort"),
                              reference, expected_from_calls(tool_calls)))
    return prompts


def render_prompt(prompt: Prompt) -> list[int]:
    from ossforge.finetune.evaluate import render_prompt as render

    return render(prompt.messages, prompt.tools, prompt.effort)


def generate(backend, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
    """Greedy continuation until a tool call (``<|call|>``) or the final answer (``<|return|>``)."""
    return list(backend.generate(prompt_ids, max_tokens=max_new_tokens, temperature=0.0))


def read_reply(tokens: list[int], prompt: Prompt) -> Reply:
    """Parse generated tokens as the agents layer does; collect tool calls and whether they are usable."""
    from ossforge.agents.parsing import parse_completion
    from ossforge.finetune.domains.scoring import check_calls
    from ossforge.model.tokenizer import decode

    known = [t.get("name") for t in prompt.tools]
    msg = parse_completion(tokens, known)
    calls = [(c["name"], c["args"]) for c in msg.tool_calls]
    calls += [(c.get("name"), _json_or_none(c.get("args"))) for c in msg.invalid_tool_calls]
    addressed = any(name in known for name, _ in calls)
    well_formed = bool(msg.tool_calls) and not msg.invalid_tool_calls
    matches = well_formed and check_calls([{"name": n, "args": a} for n, a in calls], prompt.expected, prompt.tools) is None
    return Reply(tokens, decode(tokens), calls, addressed, well_formed, matches)


def _json_or_none(text):
    """The arguments of an invalid call, when they are JSON at all (for display)."""
    try:
        return json.loads(text) if isinstance(text, str) else None
    except json.JSONDecodeError:
        return None


def load_run(run_dir: Path):
    """(config, peft model in eval mode) of a run directory."""
    from peft import PeftModel

    from ossforge.finetune.config import ModelConfig, load_config
    from ossforge.finetune.run_dir import RunDir
    from ossforge.model.checkpoint import load_model

    run = RunDir(run_dir)
    if not run.config_file.is_file():
        raise UserError(f"{run_dir}: not a run directory (no config.yaml); train first: ossforge train CONFIG")
    if not (run.adapter_dir / "adapter_config.json").is_file():
        raise UserError(f"{run.adapter_dir}: no adapter yet (adapter_config.json missing); train first")
    config = load_config(run.config_file, check_files=False)
    from ossforge.finetune.run_dir import ensure_recorded_base

    recorded = ensure_recorded_base(run.path)  # base/, or rebuilt from base_record.json
    base = str(recorded) if recorded is not None else config.model.path
    if base is None:
        raise UserError(f"{run.base_dir}: base model missing (the run used a random preset; retrain to write it)")
    model = load_model(ModelConfig(path=base), dtype=None, device="cpu")
    return config, PeftModel.from_pretrained(model, str(run.adapter_dir)).eval()


def _show(title: str, reply: Reply) -> str:
    body = textwrap.indent(textwrap.fill(reply.text, 100, replace_whitespace=False, drop_whitespace=False), "    ")
    if reply.calls:
        name, args = reply.calls[0]
        verdict = (f"tool call {name}({json.dumps(args) if args is not None else '<not JSON>'}): "
                   f"{'well-formed' if reply.well_formed else 'malformed'}"
                   f"{', arguments match the reference' if reply.matches else ''}")
    else:
        verdict = "no tool call"
    return f"{title}\n{body}\n  -> {verdict}"


def run(args: argparse.Namespace) -> int:
    import torch

    torch.manual_seed(0)
    from ossforge.agents.backends import TransformersBackend

    config, model = load_run(Path(args.run_dir))
    backend = TransformersBackend(model)  # fuses the MoE layers: without it peft rebuilds every expert's weight per token
    data = args.data or config.data.eval
    if not data:
        raise UserError(f"{args.run_dir}: the run has no data.eval; pass --data HELDOUT.jsonl")
    prompts = held_out_prompts(data)
    if not prompts:
        raise UserError(f"{data}: no held-out conversation with an assistant reply")
    if not 0 <= args.index < len(prompts):
        raise UserError(f"--index: {args.index} out of range 0..{len(prompts) - 1}")

    def reply(prompt: Prompt, tuned: bool) -> Reply:
        ids = render_prompt(prompt)
        if tuned:
            return read_reply(generate(backend, ids, args.max_new_tokens), prompt)
        with model.disable_adapter():
            return read_reply(generate(backend, ids, args.max_new_tokens), prompt)

    prompt = prompts[args.index]
    print(f"held-out prompt ({prompt.where}):")
    for m in prompt.messages:
        print(f"  {m['role']}: {m.get('content')}")
    for name, ref in prompt.reference:
        print(f"  reference: {name}({json.dumps(ref)})")
    print()
    print(_show(f"tuned model ({Path(args.run_dir) / 'adapter'}), greedy:", reply(prompt, True)))
    print()
    print(_show("base model (adapter disabled), greedy:", reply(prompt, False)))

    if args.score > 0:
        scored = [p for p in prompts if p.reference][: args.score]
        tuned = [reply(p, True) for p in scored]
        base = [reply(p, False) for p in scored]
        n = len(scored)
        print()
        print(f"on {n} held-out prompts that need a tool call:")
        for title, replies in (("tuned", tuned), ("base", base)):
            print(f"  {title:5}  calls a known tool {sum(r.addressed for r in replies)}/{n}, "
                  f"well-formed (JSON arguments) {sum(r.well_formed for r in replies)}/{n}, "
                  f"reference arguments {sum(r.matches for r in replies)}/{n}")
    return 0
