"""Harmony training data: load rows with ``datasets``, validate them, render them to examples.

Formats (all through Hugging Face ``datasets``):
- ``.jsonl`` / ``.json`` (JSON lines): read line by line with the ``text`` builder and parsed here,
  so every row keeps its 1-based line number and its exact JSON. (The ``json`` builder would turn
  rows into Arrow structs, which adds ``None`` for every key another row has: tool arguments
  would change and so would the rendered tokens.)
- ``.parquet`` files and local dataset dirs (``save_to_disk``; a ``DatasetDict`` must have a
  ``train`` split or a single split): the "line" is the 1-based row number. ``None`` values that
  Arrow adds to dicts in ``tools`` and tool-call ``arguments`` are removed, but Arrow also orders
  struct keys by its schema: store arguments as JSON strings to keep their exact text (and
  explicit nulls). A ``messages`` or ``tools`` column may hold JSON text.
- a plain directory of such files: each file in name order.

Data errors are found before training starts: :func:`build_examples` validates every row first and
raises :class:`UserError` with the first bad row as ``FILE:LINE: reason``.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from ossforge.errors import UserError
from ossforge.finetune import harmony

JSONL_SUFFIXES = (".jsonl", ".json")
PARQUET_SUFFIXES = (".parquet",)


@dataclass
class Row:
    """One dataset row and where it came from (``file:line`` in messages)."""

    file: str
    line: int
    data: Any = None
    error: str | None = None  # set when the line is not JSON
    rendered: tuple[list[int], list[int]] | None = None  # (input_ids, labels) once validated

    @property
    def where(self) -> str:
        return f"{self.file}:{self.line}"


# ----------------------------------------------------------------------------- loading


def _quiet_datasets():
    import datasets

    datasets.disable_progress_bars()
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)  # errors reach the user as UserError
    return datasets


def _data_files(path: Path) -> list[Path]:
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix in JSONL_SUFFIXES + PARQUET_SUFFIXES)
        if not files:
            raise UserError(f"{path}: no .jsonl or .parquet files and not a saved dataset (save_to_disk)")
        return files
    return [path]


def _iter_raw(path: str | Path) -> Iterator[Row]:
    """Every row of a file or folder, unparsed JSON lines reported as ``Row.error``."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: file not found")
    if path.is_dir() and ((path / "dataset_info.json").is_file() or (path / "dataset_dict.json").is_file()):
        yield from _iter_saved(path)
        return
    for file in _data_files(path):
        if file.suffix in PARQUET_SUFFIXES:
            yield from _iter_arrow(file, _load(file, "parquet"))
        elif file.suffix in JSONL_SUFFIXES:
            yield from _iter_jsonl(file)
        else:
            raise UserError(f"{file}: unsupported data file (use .jsonl, .parquet or a saved dataset folder)")


def _load(file: Path, builder: str):
    """One file through a ``datasets`` builder, held in memory. A private, throw-away cache dir:
    the shared HF cache could serve a stale copy of an edited file, and parallel processes
    (pytest -n, several ranks) would race on the same cache entry."""
    datasets = _quiet_datasets()
    with tempfile.TemporaryDirectory(prefix="ossforge-data-") as cache:
        try:
            return datasets.load_dataset(builder, data_files=str(file), split="train", cache_dir=cache,
                                         keep_in_memory=True)
        except Exception as exc:  # datasets raises many types; the user needs the file and the reason
            raise UserError(f"{file}: cannot read as {builder}: {_root_reason(exc)}") from None


def _root_reason(exc: BaseException) -> str:
    """The innermost cause of a datasets error ("An error occurred while generating..." says little)."""
    while exc.__cause__ is not None or exc.__context__ is not None:
        exc = exc.__cause__ or exc.__context__
    if isinstance(exc, UnicodeDecodeError):
        return f"not UTF-8 text (byte {exc.start})"
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _iter_jsonl(file: Path) -> Iterator[Row]:
    if file.stat().st_size == 0:
        return  # datasets refuses empty files; an empty file simply has no rows
    for i, text in enumerate(_load(file, "text")["text"], start=1):
        if not text.strip():
            continue  # blank lines (e.g. a trailing newline) are not rows
        try:
            yield Row(str(file), i, json.loads(text))
        except json.JSONDecodeError as exc:
            yield Row(str(file), i, error=f"bad JSON: {exc.msg} (column {exc.colno})")


def _iter_saved(path: Path) -> Iterator[Row]:
    datasets = _quiet_datasets()
    try:
        ds = datasets.load_from_disk(str(path))
    except Exception as exc:
        raise UserError(f"{path}: cannot load saved dataset: {exc}") from None
    if isinstance(ds, datasets.DatasetDict):
        if "train" in ds:
            ds = ds["train"]
        elif len(ds) == 1:
            ds = next(iter(ds.values()))
        else:
            raise UserError(f"{path}: dataset has splits {', '.join(ds)}; expected 'train' or a single split")
    yield from _iter_arrow(path, ds)


def _iter_arrow(file: Path, ds) -> Iterator[Row]:
    for i, row in enumerate(ds, start=1):
        yield Row(str(file), i, _from_arrow(row))


def _drop_none(value):
    if isinstance(value, dict):
        return {k: _drop_none(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_drop_none(v) for v in value]
    return value


def _from_arrow(row: dict) -> dict:
    """Undo what Arrow's struct unification did to a row (see module docstring)."""
    row = dict(row)
    for key in ("messages", "tools"):
        if isinstance(row.get(key), str):
            try:
                row[key] = json.loads(row[key])
            except json.JSONDecodeError:
                pass  # validation reports it
    if isinstance(row.get("tools"), list):
        row["tools"] = [_drop_none(t) for t in row["tools"]]
    for msg in row.get("messages") or []:
        if isinstance(msg, dict):
            for call in msg.get("tool_calls") or []:
                fn = call.get("function") if isinstance(call, dict) else None
                if isinstance(fn, dict) and isinstance(fn.get("arguments"), dict):
                    fn["arguments"] = _drop_none(fn["arguments"])
    if row.get("tools") is None:
        row.pop("tools", None)
    if row.get("reasoning_effort") is None:
        row.pop("reasoning_effort", None)
    return row


def load_rows(path: str | Path) -> list[dict]:
    """All rows of a JSONL / parquet file or dataset folder, as dicts in the row format."""
    rows = []
    for row in _iter_raw(path):
        if row.error:
            raise UserError(f"{row.where}: {row.error}")
        rows.append(row.data)
    return rows


# ----------------------------------------------------------------------------- validation


def row_problem(row: Any) -> str | None:
    """Why a row cannot be trained on, or None when it is fine."""
    if not isinstance(row, dict):
        return f"row must be a JSON object, got {type(row).__name__}"
    effort = row.get("reasoning_effort")
    if effort is not None and (not isinstance(effort, str) or effort.lower() not in harmony.REASONING_EFFORTS):
        return f"reasoning_effort: must be low, medium or high, got {effort!r}"

    tools = row.get("tools")
    names: set[str] = set()
    if tools is not None:
        if not isinstance(tools, list):
            return "tools: must be a list"
        for t, tool in enumerate(tools):
            spec = harmony.tool_spec(tool)
            if not isinstance(spec, dict) or not isinstance(spec.get("name"), str) or not spec["name"]:
                return f"tools[{t}]: needs a name"
            if spec["name"] in names:
                return f"tools[{t}]: duplicate tool name {spec['name']!r}"
            if spec.get("description") is not None and not isinstance(spec["description"], str):
                return f"tools[{t}].description: must be a string"
            if spec.get("parameters") is not None and not isinstance(spec["parameters"], dict):
                return f"tools[{t}].parameters: must be a JSON schema object"
            names.add(spec["name"])

    messages = row.get("messages")
    if not isinstance(messages, list) or not messages:
        return "messages: missing or empty (need a list of messages)"
    pending: list[tuple[Any, str]] = []  # unanswered calls: (id, name)
    started = has_assistant = False
    for m, msg in enumerate(messages):
        at = f"messages[{m}]"
        if not isinstance(msg, dict):
            return f"{at}: must be an object"
        role = msg.get("role")
        if role not in harmony.ROLES:
            return f"{at}: unknown role {role!r} (use {', '.join(harmony.ROLES)})"
        if role != "tool":  # tool results may be any JSON value
            try:
                harmony.text_of(msg.get("content"))
            except ValueError as exc:
                return f"{at}.content: {exc}"
        if role in ("system", "developer"):
            if started:
                return f"{at}: {role} message after the conversation started (put it first)"
            continue
        started = True
        if role == "assistant":
            has_assistant = True
            problem = _assistant_problem(at, msg, names, pending)
            if problem:
                return problem
        elif role == "tool":
            try:
                harmony.match_tool_result(msg, pending)
            except ValueError as exc:
                return f"{at}: {exc}"
            content = msg.get("content")
            if content is None:
                return f"{at}.content: missing tool result"
    if not has_assistant:
        return "no assistant message (nothing to train on)"
    return None


def _assistant_problem(at: str, msg: dict, tool_names: set[str], pending: list) -> str | None:
    thinking, calls = msg.get("thinking"), msg.get("tool_calls")
    if thinking is not None and not isinstance(thinking, str):
        return f"{at}.thinking: must be a string"
    if calls is not None and not isinstance(calls, list):
        return f"{at}.tool_calls: must be a list"
    if not (thinking or harmony.text_of(msg.get("content")) or calls):
        return f"{at}: assistant message needs thinking, content or tool_calls"
    for c, call in enumerate(calls or []):
        where = f"{at}.tool_calls[{c}]"
        fn = call.get("function") if isinstance(call, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
            return f"{where}: needs function.name"
        name = fn["name"]
        if name not in tool_names:
            known = ", ".join(sorted(tool_names)) or "none"
            return f"{where}: call to tool {name!r} which is not in tools (tools: {known})"
        args = fn.get("arguments", {})
        if isinstance(args, str):
            try:
                args = json.loads(args)
            except json.JSONDecodeError as exc:
                return f"{where}.function.arguments: not valid JSON: {exc.msg}"
        if not isinstance(args, dict):
            return f"{where}.function.arguments: must be a JSON object, got {type(args).__name__}"
        pending.append((call.get("id"), name))
    return None


def _render_problem(row: Row, drop_analysis: bool) -> str | None:
    try:
        row.rendered = harmony.render_row(row.data, drop_analysis=drop_analysis)
    except Exception as exc:  # harmony's own refusal is a data error too
        return f"cannot render with openai-harmony: {exc}"
    return None


def validate_rows(path: str | Path, *, drop_analysis: bool = False) -> tuple[list[Row], list[str]]:
    """(good rows, each with ``rendered`` set; problems as ``FILE:LINE: reason``) of a dataset."""
    good, problems = [], []
    for row in _iter_raw(path):
        problem = row.error or row_problem(row.data) or _render_problem(row, drop_analysis)
        if problem:
            problems.append(f"{row.where}: {problem}")
        else:
            good.append(row)
    return good, problems


def validate_file(path: str | Path) -> list[str]:
    """Every bad row of a dataset as ``FILE:LINE: reason`` (empty when all rows are fine)."""
    return validate_rows(path)[1]


def check_or_raise(path: str | Path, *, drop_analysis: bool = False) -> list[Row]:
    """The rendered rows of a dataset; UserError naming the first bad row (and how many more)."""
    good, problems = validate_rows(path, drop_analysis=drop_analysis)
    if problems:
        more = f" (and {len(problems) - 1} more bad rows; run `ossforge data check {path}`)" if len(problems) > 1 else ""
        raise UserError(problems[0] + more)
    if not good:
        raise UserError(f"{path}: no rows")
    return good


# ----------------------------------------------------------------------------- examples


@dataclass
class RenderStats:
    """What rendering did to a dataset, so nothing is cut silently."""

    rows: int = 0
    examples: int = 0
    tokens: int = 0
    trained_tokens: int = 0
    truncated_rows: int = 0
    cut_tokens: int = 0
    dropped_rows: int = 0  # nothing left to train on after truncation
    seq_len: int | None = None
    longest_row: int = 0
    lengths: list[int] = field(default_factory=list, repr=False)

    def summary(self) -> str:
        line = (f"{self.rows} rows -> {self.examples} examples, {self.tokens} tokens "
                f"({self.trained_tokens} trained), longest row {self.longest_row} tokens")
        if self.seq_len is not None:
            line += (f"; seq_len {self.seq_len}: {self.truncated_rows} rows truncated "
                     f"({self.cut_tokens} tokens cut), {self.dropped_rows} dropped")
        return line


def _truncate(ids: list[int], labels: list[int], seq_len: int | None, stats: RenderStats):
    if seq_len is None or len(ids) <= seq_len:
        return ids, labels
    stats.truncated_rows += 1
    stats.cut_tokens += len(ids) - seq_len
    return ids[:seq_len], labels[:seq_len]


def render_rows(rows: list[dict], seq_len: int | None = None, *, drop_analysis: bool = False,
                packing: bool = False) -> tuple[list[dict], RenderStats]:
    """Examples ``{"input_ids", "labels"}`` of valid rows: truncated to ``seq_len`` (None: never),
    rows with nothing left to train on dropped, and with ``packing`` whole conversations
    concatenated greedily while they fit in ``seq_len``, each packed row with ``position_ids``
    restarting at 0 at every conversation (its document boundaries)."""
    rendered = [harmony.render_row(row, drop_analysis=drop_analysis) for row in rows]
    return examples_from_rendered(rendered, seq_len, packing=packing)


def examples_from_rendered(rendered: list[tuple[list[int], list[int]]], seq_len: int | None, *,
                           packing: bool = False) -> tuple[list[dict], RenderStats]:
    """Truncate, drop and (optionally) pack rendered rows; see :func:`render_rows`."""
    if packing and seq_len is None:
        raise ValueError("packing needs a seq_len")
    stats = RenderStats(rows=len(rendered), seq_len=seq_len)
    kept = []
    for ids, labels in rendered:
        stats.longest_row = max(stats.longest_row, len(ids))
        ids, labels = _truncate(ids, labels, seq_len, stats)
        if all(label == harmony.IGNORE for label in labels):
            stats.dropped_rows += 1
            continue
        kept.append((ids, labels))

    examples: list[dict] = []
    if packing:
        # position_ids restart at 0 with every conversation: the model's masks keep attention (and the
        # sliding window) inside each one (ossforge.model.attention), and RoPE sees its own positions.
        row: dict = {"input_ids": [], "labels": [], "position_ids": []}
        for ids, labels in kept:
            if row["input_ids"] and len(row["input_ids"]) + len(ids) > seq_len:
                examples.append(row)
                row = {"input_ids": [], "labels": [], "position_ids": []}
            row["input_ids"] += ids
            row["labels"] += labels
            row["position_ids"] += range(len(ids))
        if row["input_ids"]:
            examples.append(row)
    else:
        examples = [{"input_ids": ids, "labels": labels} for ids, labels in kept]

    stats.examples = len(examples)
    stats.lengths = [len(e["input_ids"]) for e in examples]
    stats.tokens = sum(stats.lengths)
    stats.trained_tokens = sum(sum(1 for x in e["labels"] if x != harmony.IGNORE) for e in examples)
    return examples, stats


def build_examples(path: str | Path, seq_len: int | None, *, drop_analysis: bool = False,
                   packing: bool = False) -> tuple[list[dict], RenderStats]:
    """Validate a dataset (UserError on the first bad row) and render it to training examples."""
    rows = check_or_raise(path, drop_analysis=drop_analysis)
    examples, stats = examples_from_rendered([r.rendered for r in rows], seq_len, packing=packing)
    if not examples:
        raise UserError(f"{path}: no examples left after truncation to seq_len {seq_len} ({stats.summary()})")
    return examples, stats
