"""Talk to a domain assistant (medicine or education) in the terminal.

The answer streams as it is written; tool calls and their results are shown as they happen; the
model's reasoning (analysis channel) is shown only with --show-reasoning. Reads one message per
line from stdin (so it can be piped); `exit` or end of input quits.

model, in order: --server URL (OpenAI-compatible /v1/completions, e.g. vLLM), --model DIR and/or
--adapter DIR (local; an adapter finds its base in <run>/base), else runs/quickstart if it exists.

examples:
  ossforge chat --domain medicine --adapter runs/quickstart/adapter
  ossforge chat --domain education --model merged/ --show-reasoning
  ossforge chat --domain medicine --server http://localhost:8000/v1 --server-model med
  echo "Dose of paracetamol for 18 kg?" | ossforge chat --domain medicine
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from ossforge.errors import UserError

DEFAULT_RUN = Path("runs/quickstart")


def add_arguments(p):
    p.add_argument("--domain", required=True, choices=["medicine", "education"], help="which assistant")
    p.add_argument("--adapter", metavar="DIR", help="peft LoRA adapter folder (e.g. runs/quickstart/adapter)")
    p.add_argument("--model", metavar="DIR", help="HF model folder (base or merged checkpoint)")
    add_server_arguments(p)
    p.add_argument("--scripted", metavar="FILE",
                   help="replay completions from a JSON list of strings instead of a model (demos, tests)")
    p.add_argument("--compact", action="store_true",
                   help="use the training data's short system prompt and single tool (small models such as the "
                        "quickstart; on by default when falling back to runs/quickstart)")
    p.add_argument("--show-reasoning", action="store_true", help="also print the analysis channel")
    p.add_argument("--reasoning-effort", choices=["low", "medium", "high"], default="low",
                   help="how long the model thinks before answering")
    p.add_argument("--max-tokens", type=int, default=512, help="tokens per model call (default 512)")
    p.add_argument("--temperature", type=float, default=0.0, help="sampling temperature; 0 always picks the likeliest token")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument("--trace", metavar="FILE", help="append a JSONL record of every step to FILE, with emails, "
                   "phone numbers, record numbers and other personal details replaced by tags "
                   "(default: nothing is written)")


def add_server_arguments(p):
    """--server / --server-model / --api-key / --server-timeout / --server-retries (also used by ossforge eval)."""
    p.add_argument("--server", metavar="URL",
                   help="OpenAI-compatible server to use instead of a local model, e.g. http://localhost:8000/v1 "
                        "(vLLM; talks raw harmony over /v1/completions)")
    p.add_argument("--server-model", default="gpt-oss", metavar="NAME",
                   help="model name the server knows: vLLM's --served-model-name, or a --lora-modules name "
                        "such as med (default: gpt-oss)")
    p.add_argument("--api-key", metavar="KEY",
                   help="key sent to --server (default: $OSSFORGE_API_KEY, else $OPENAI_API_KEY)")
    p.add_argument("--server-timeout", type=float, default=120.0, metavar="S",
                   help="seconds for one whole server reply (default 120)")
    p.add_argument("--server-retries", type=int, default=3, metavar="N",
                   help="retries with backoff on HTTP 429/5xx and dropped connections (default 3)")


def server_backend(args):
    """The OpenAICompatibleBackend the --server flags describe."""
    from ossforge.agents.backends import OpenAICompatibleBackend

    if not args.server.startswith(("http://", "https://")):
        raise UserError(f"--server: expected an http:// or https:// URL, got {args.server!r}")
    if args.server_timeout <= 0:
        raise UserError(f"--server-timeout: must be > 0, got {args.server_timeout}")
    if args.server_retries < 0:
        raise UserError(f"--server-retries: must be >= 0, got {args.server_retries}")
    return OpenAICompatibleBackend(args.server, args.server_model, api_key=args.api_key,
                                   timeout=args.server_timeout, max_retries=args.server_retries)


def _backend(args):
    from ossforge.agents import backends

    if args.scripted:
        path = Path(args.scripted)
        try:
            completions = json.loads(path.read_text())
        except FileNotFoundError:
            raise UserError(f"{path}: file not found") from None
        except json.JSONDecodeError as exc:
            raise UserError(f"{path}:{exc.lineno}: not valid JSON: {exc.msg}") from None
        if not isinstance(completions, list) or not all(isinstance(c, str) for c in completions):
            raise UserError(f"{path}: must be a JSON list of completion strings")
        return backends.ScriptedBackend(completions)
    if args.server:
        return server_backend(args)
    model_dir, adapter_dir = args.model, args.adapter
    if model_dir is None and adapter_dir is None:
        if (DEFAULT_RUN / "adapter" / "adapter_config.json").is_file():
            adapter_dir = DEFAULT_RUN / "adapter"
            args.compact = True
            print(f"(using {adapter_dir} with the compact training prompt)", file=sys.stderr)
        else:
            raise UserError("--model: no model given and runs/quickstart/adapter does not exist; "
                            "train one with `make quickstart`, or pass --adapter DIR, --model DIR or --server URL")
    for flag, d in (("--model", model_dir), ("--adapter", adapter_dir)):
        if d is not None and not Path(d).is_dir():
            raise UserError(f"{d}: {flag} folder not found")
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    return backends.TransformersBackend.from_paths(model_dir, adapter_dir, device=device)


class _Printer:
    """Turns agent events into terminal output (reasoning only when asked)."""

    def __init__(self, show_reasoning: bool, out=sys.stdout):
        self.show_reasoning = show_reasoning
        self.out = out
        self.mode = None

    def _switch(self, mode: str, header: str = ""):
        if self.mode != mode:
            if self.mode is not None:
                self.out.write("\n")
            if header:
                self.out.write(header)
            self.mode = mode

    def __call__(self, kind: str, value):
        if kind == "reasoning":
            if not self.show_reasoning:
                return
            self._switch("reasoning", "[reasoning] ")
            self.out.write(value)
        elif kind == "content":
            self._switch("content", "assistant> ")
            self.out.write(value)
        elif kind == "notice":
            self._switch("notice")
            self.out.write(f"[!] {value}\n")
            self.mode = None
        elif kind == "tool_call":
            self._switch("tool")
            self.out.write(f"[tool] {value['name']}({json.dumps(value['args'], ensure_ascii=False)})\n")
            self.mode = None
        elif kind == "tool_result":
            self._switch("tool")
            self.out.write(f"[tool result] {value['name']}: {value['content']}\n")
            self.mode = None
        elif kind == "invalid_tool_call":
            self._switch("tool")
            self.out.write(f"[malformed tool call] {value.get('name')}: {value.get('error')}\n")
            self.mode = None
        self.out.flush()

    def end_turn(self):
        if self.mode is not None:
            self.out.write("\n")
        self.mode = None
        self.out.flush()


def _approve(name: str, args: dict) -> bool:
    if not sys.stdin.isatty():
        return False
    answer = input(f"run tool {name} with {json.dumps(args)}? [y/N] ")
    return answer.strip().lower() in ("y", "yes")


def run(args):
    from ossforge.agents.backends import BackendError
    from ossforge.agents.chat_model import ChatGptOss
    from ossforge.agents.loop import build_domain_agent
    from ossforge.agents.trace import Trace

    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)  # library deprecation noise, not for chat users
    if args.max_tokens < 1:
        raise UserError(f"--max-tokens: must be >= 1, got {args.max_tokens}")
    backend = _backend(args)
    try:
        trace = Trace(args.trace) if args.trace else None  # private by default: no trace unless asked for
    except OSError as exc:
        raise UserError(f"{args.trace}: --trace: cannot write the trace file: {exc.strerror}") from None
    llm = ChatGptOss(backend=backend, reasoning_effort=args.reasoning_effort, max_tokens=args.max_tokens,
                     temperature=args.temperature)
    agent = build_domain_agent(args.domain, llm, compact=args.compact, trace=trace, approve=_approve,
                               stream=True)
    printer = _Printer(args.show_reasoning)
    interactive = sys.stdin.isatty()
    if interactive:
        print(f"ossforge {args.domain} assistant ({backend.name}); `exit` to quit."
              + (f" trace: {args.trace}" if args.trace else ""))
    history = []
    while True:
        if interactive:
            print("you> ", end="", flush=True)
        line = sys.stdin.readline()
        if not line:
            break
        text = line.strip()
        if not text:
            continue
        if text in ("exit", "quit"):
            break
        try:
            result = agent.run(text, history=history, on_event=printer)
        except BackendError as exc:  # already one line naming the server
            printer.end_turn()
            raise UserError(str(exc)) from None
        except RuntimeError as exc:
            printer.end_turn()
            raise UserError(f"{args.server or 'model'}: {exc}") from None
        printer.end_turn()
        history = [m for m in result.messages if m.type != "system"]
    return 0
