"""Show what a trained run does on a held-out prompt.

Loads RUN_DIR's base model and adapter (stock transformers + peft), renders the first user turn of a
held-out conversation with openai-harmony, and greedily generates the assistant's reply with and
without the adapter. The harmony output is printed as tokens (``<|channel|>`` ...) and parsed back
with openai-harmony to tell whether it holds a well-formed tool call. ``--score N`` counts well-formed
tool calls of both models over N held-out prompts.

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
    p.add_argument("--max-new-tokens", type=int, default=128, metavar="T")


@dataclass
class Prompt:
    where: str
    messages: list[dict]  # the conversation up to the first assistant reply
    tools: list[dict]
    effort: str | None
    reference: list[tuple[str, dict]]  # the reference reply's tool calls: (name, arguments)


@dataclass
class Reply:
    tokens: list[int]
    text: str  # harmony tokens written out
    calls: list[tuple[str, object]]  # parsed tool calls: (name, arguments or None when not JSON)
    addressed: bool  # a harmony message addressed to a known tool (functions.NAME)
    well_formed: bool  # a call to a known tool with a JSON object as arguments
    matches: bool  # the calls equal the reference calls


def held_out_prompts(path: str) -> list[Prompt]:
    """Every held-out row that has an assistant reply, cut before that reply."""
    from ossforge.finetune.data import load_rows
    from ossforge.finetune.harmony import call_name_and_args

    prompts = []
    for line, row in enumerate(load_rows(path), start=1):
        messages = row.get("messages") or []
        first = next((i for i, m in enumerate(messages) if m.get("role") == "assistant"), None)
        if not first:
            continue
        reference = []
        for call in messages[first].get("tool_calls") or []:
            name, args = call_name_and_args(call)
            reference.append((name, json.loads(args)))
        prompts.append(Prompt(f"{path}:{line}", messages[:first], row.get("tools") or [], row.get("reasoning_effort"), reference))
    return prompts


def render_prompt(prompt: Prompt) -> list[int]:
    import openai_harmony as oh

    from ossforge.finetune.harmony import build_conversation
    from ossforge.model.tokenizer import harmony_encoding

    convo = build_conversation(prompt.messages, prompt.tools, prompt.effort)
    return [int(t) for t in harmony_encoding().render_conversation_for_completion(convo, oh.Role.ASSISTANT)]


def generate(model, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
    """Greedy continuation until a tool call (``<|call|>``) or the final answer (``<|return|>``).

    When a message ends (``<|end|>``, e.g. after the reasoning) the next message header
    ``<|start|>assistant`` is appended, as a harmony inference stack does: training labels start
    after that pair (DESIGN §3), so the model learns what follows it, not the header itself.
    """
    import torch

    from ossforge.finetune.harmony import ASSISTANT
    from ossforge.model import tokenizer as tok

    new: list[int] = []
    while len(new) < max_new_tokens:
        ids = torch.tensor([prompt_ids + new])
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                 max_new_tokens=max_new_tokens - len(new), do_sample=False, use_cache=True,
                                 eos_token_id=[tok.END, tok.CALL, tok.RETURN], pad_token_id=tok.PAD)
        new += out[0, ids.shape[1]:].tolist()
        if not new or new[-1] != tok.END or len(new) + 2 >= max_new_tokens:
            break
        new += [tok.START, ASSISTANT]
    return new


def read_reply(tokens: list[int], prompt: Prompt) -> Reply:
    """Parse generated tokens with openai-harmony; collect tool calls and whether they are usable."""
    import openai_harmony as oh

    from ossforge.model.tokenizer import decode, harmony_encoding

    calls = []
    try:
        messages = harmony_encoding().parse_messages_from_completion_tokens(tokens, oh.Role.ASSISTANT)
    except Exception:  # not valid harmony: no usable call
        messages = []
    for msg in messages:
        recipient = msg.recipient or ""
        if not recipient.startswith("functions."):
            continue
        text = "".join(getattr(c, "text", "") for c in msg.content)
        try:
            args = json.loads(text)
        except json.JSONDecodeError:
            args = None
        calls.append((recipient[len("functions."):], args))
    known = {t.get("name") for t in prompt.tools}
    addressed = any(name in known for name, _ in calls)
    well_formed = bool(calls) and all(name in known and isinstance(args, dict) for name, args in calls)
    matches = well_formed and _same_calls(calls, prompt.reference)
    return Reply(tokens, decode(tokens), calls, addressed, well_formed, matches)


def _same_calls(calls, reference) -> bool:
    if len(calls) != len(reference):
        return False
    for (name, args), (ref_name, ref_args) in zip(calls, reference):
        if name != ref_name or set(args) != set(ref_args):
            return False
        for key, value in ref_args.items():
            got = args[key]
            if isinstance(value, (int, float)) and isinstance(got, (int, float)):
                if abs(float(got) - float(value)) > 1e-9:
                    return False
            elif got != value:
                return False
    return True


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
    base = str(run.base_dir) if (run.base_dir / "config.json").is_file() else config.model.path
    if base is None:
        raise UserError(f"{run.base_dir}: base model missing (the run used a random preset; retrain to write it)")
    from ossforge.model import fuse_moe

    model = load_model(ModelConfig(path=base), dtype=None, device="cpu")
    model = PeftModel.from_pretrained(model, str(run.adapter_dir)).eval()
    return config, fuse_moe(model)  # same outputs; without it peft rebuilds every expert's weight per token


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
    config, model = load_run(Path(args.run_dir))
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
            return read_reply(generate(model, ids, args.max_new_tokens), prompt)
        with model.disable_adapter():
            return read_reply(generate(model, ids, args.max_new_tokens), prompt)

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
