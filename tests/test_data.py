"""Loading (JSONL, parquet, saved dataset dirs), validation as FILE:LINE: reason, packing and
truncation counts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ossforge.errors import UserError
from ossforge.finetune import data
from ossforge.finetune.harmony import IGNORE, render_row

FIXTURE = Path(__file__).parent / "fixtures" / "data" / "valid.jsonl"
TOOL = {"name": "f", "description": "d", "parameters": {"type": "object", "properties": {"x": {"type": "integer"}}}}


def _good(**extra):
    row = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    row.update(extra)
    return row


def _call_row(args, name="f", tools=(TOOL,)):
    return {"messages": [{"role": "user", "content": "go"},
                         {"role": "assistant", "tool_calls": [{"type": "function", "function": {"name": name, "arguments": args}}]},
                         {"role": "tool", "name": name, "content": "1"},
                         {"role": "assistant", "content": "done"}],
            "tools": list(tools)}


def _write(tmp_path, lines, name="d.jsonl"):
    path = tmp_path / name
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line, ensure_ascii=False)) + "\n" for line in lines))
    return path


def test_fixture_rows_are_valid():
    assert data.validate_file(FIXTURE) == []
    rows = data.load_rows(FIXTURE)
    assert len(rows) == 3 and rows[1]["reasoning_effort"] == "high"


BAD_ROWS = [
    ('{"messages": [', "bad JSON"),
    ("[1, 2]", "row must be a JSON object"),
    ({"tools": []}, "messages: missing or empty"),
    ({"messages": []}, "messages: missing or empty"),
    ({"messages": ["hi"]}, "messages[0]: must be an object"),
    ({"messages": [{"role": "bot", "content": "x"}, {"role": "assistant", "content": "y"}]}, "messages[0]: unknown role 'bot'"),
    ({"messages": [{"role": "user", "content": "x"}]}, "no assistant message"),
    (_good(reasoning_effort="extreme"), "reasoning_effort: must be low, medium or high"),
    (_call_row({"x": 1}, name="g"), "call to tool 'g' which is not in tools"),
    (_call_row({"x": 1}, tools=()), "call to tool 'f' which is not in tools (tools: none)"),
    (_call_row("{x: 1"), "arguments: not valid JSON"),
    (_call_row("[1, 2]"), "arguments: must be a JSON object, got list"),
    (_call_row(7), "arguments: must be a JSON object, got int"),
    ({"messages": [{"role": "user", "content": "x"}, {"role": "tool", "name": "f", "content": "1"},
                   {"role": "assistant", "content": "y"}], "tools": [TOOL]}, "without a matching assistant tool call"),
    ({"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "f", "arguments": {}}}]},
        {"role": "tool", "tool_call_id": "c1", "name": "g", "content": "1"}], "tools": [TOOL]}, "a call to 'f'"),
    ({"messages": [{"role": "user", "content": "x"}, {"role": "assistant"}]}, "needs thinking, content or tool_calls"),
    ({"messages": [{"role": "user", "content": "x"}, {"role": "system", "content": "s"},
                   {"role": "assistant", "content": "y"}]}, "after the conversation started"),
    (_good(tools={"f": 1}), "tools: must be a list"),
    (_good(tools=[{"description": "no name"}]), "tools[0]: needs a name"),
    (_good(tools=[TOOL, TOOL]), "duplicate tool name"),
    ({"messages": [{"role": "user", "content": {"a": 1}}, {"role": "assistant", "content": "y"}]}, "messages[0].content"),
]


@pytest.mark.parametrize("bad, reason", BAD_ROWS, ids=[r for _, r in BAD_ROWS])
def test_bad_row_reported_with_file_and_line(tmp_path, bad, reason):
    path = _write(tmp_path, [_good(), "", bad, _good()])  # blank line 2 still counts
    problems = data.validate_file(path)
    assert len(problems) == 1, problems
    assert problems[0].startswith(f"{path}:3: ")
    assert reason in problems[0]
    with pytest.raises(UserError, match=f"^{path}:3: "):
        data.build_examples(path, 64)


def test_every_bad_row_listed_and_counted(tmp_path):
    path = _write(tmp_path, ["{", _good(), {"messages": []}, _good(reasoning_effort="max")])
    problems = data.validate_file(path)
    assert [p.split(": ")[0] for p in problems] == [f"{path}:1", f"{path}:3", f"{path}:4"]
    with pytest.raises(UserError, match=r"and 2 more bad rows"):
        data.build_examples(path, None)
    with pytest.raises(UserError, match=r":1: bad JSON"):
        data.load_rows(path)


def test_missing_and_unsupported_files(tmp_path):
    with pytest.raises(UserError, match="file not found"):
        data.load_rows(tmp_path / "nope.jsonl")
    other = tmp_path / "x.csv"
    other.write_text("a,b\n")
    with pytest.raises(UserError, match="unsupported data file"):
        data.load_rows(other)
    latin = tmp_path / "latin.jsonl"
    latin.write_bytes(b'{"a": "\xff"}\n')
    with pytest.raises(UserError, match=f"^{latin}: cannot read as text: not UTF-8"):
        data.load_rows(latin)
    fake = tmp_path / "fake.parquet"
    fake.write_text("not parquet")
    with pytest.raises(UserError, match=f"^{fake}: cannot read as parquet"):
        data.load_rows(fake)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    assert data.load_rows(empty) == []
    with pytest.raises(UserError, match=f"^{empty}: no rows"):
        data.build_examples(empty, 64)


def _hetero_rows():
    """Rows whose tool arguments and schemas have different keys: Arrow would unify them."""
    a = _call_row({"x": 1})
    a["reasoning_effort"] = "medium"  # Dataset.from_list takes its columns from the first row
    b = _call_row({"y": "é"}, tools=[{"name": "f", "description": "d",
                                      "parameters": {"type": "object", "properties": {"y": {"type": "string"}}}}])
    b["reasoning_effort"] = "low"
    return [a, b]


def test_parquet_and_saved_dataset_render_like_jsonl(tmp_path):
    import datasets

    rows = _hetero_rows()
    jsonl = _write(tmp_path, rows)
    ds = datasets.Dataset.from_list(rows)
    ds.to_parquet(str(tmp_path / "d.parquet"))
    ds.save_to_disk(str(tmp_path / "saved"))
    datasets.DatasetDict({"train": ds}).save_to_disk(str(tmp_path / "saved_dict"))
    folder = tmp_path / "folder"
    folder.mkdir()
    _write(folder, rows[:1], "a.jsonl")
    ds.select([1]).to_parquet(str(folder / "b.parquet"))

    want = [render_row(r) for r in rows]
    assert [render_row(r) for r in data.load_rows(jsonl)] == want
    for source in ("d.parquet", "saved", "saved_dict", "folder"):
        got = [render_row(r) for r in data.load_rows(tmp_path / source)]
        assert got == want, source
        assert data.validate_file(tmp_path / source) == []


def test_parquet_bad_row_uses_row_number(tmp_path):
    import datasets

    rows = [_good(reasoning_effort="low"), _good(reasoning_effort="huge")]
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "d.parquet"))
    assert data.validate_file(tmp_path / "d.parquet") == [f"{tmp_path / 'd.parquet'}:2: reasoning_effort: must be low, medium or high, got 'huge'"]


def test_messages_as_json_text_in_parquet(tmp_path):
    import datasets

    rows = _hetero_rows()
    flat = [{"messages": json.dumps(r["messages"]), "tools": json.dumps(r["tools"])} for r in rows]
    datasets.Dataset.from_list(flat).to_parquet(str(tmp_path / "t.parquet"))
    got = data.load_rows(tmp_path / "t.parquet")
    assert got[0]["messages"] == rows[0]["messages"] and got[1]["tools"] == rows[1]["tools"]


def test_truncation_and_dropped_counts(tmp_path):
    examples, stats = data.build_examples(FIXTURE, None)
    lengths = [len(e["input_ids"]) for e in examples]
    assert stats.rows == stats.examples == 3 and stats.truncated_rows == 0 and stats.tokens == sum(lengths)
    # cut between the shortest and the longest row
    seq_len = sorted(lengths)[1] - 1
    cut, cstats = data.build_examples(FIXTURE, seq_len)
    assert all(len(e["input_ids"]) == len(e["labels"]) <= seq_len for e in cut)
    assert cstats.truncated_rows == 2
    assert cstats.cut_tokens == sum(n - seq_len for n in lengths if n > seq_len)
    assert "2 rows truncated" in cstats.summary() and f"{cstats.cut_tokens} tokens cut" in cstats.summary()
    # a seq_len that only keeps the system/developer prompt leaves nothing to train on
    tiny, tstats = data.render_rows(data.load_rows(FIXTURE), 40)
    assert tiny == [] and tstats.dropped_rows == 3 and tstats.truncated_rows == 3
    with pytest.raises(UserError, match="no examples left"):
        data.build_examples(FIXTURE, 40)


def test_packing_keeps_whole_conversations(tmp_path):
    rows = data.load_rows(FIXTURE)
    rendered = [render_row(r) for r in rows]
    lengths = [len(ids) for ids, _ in rendered]
    seq_len = lengths[0] + lengths[1]  # rows 1+2 fit together, row 3 alone
    examples, stats = data.build_examples(FIXTURE, seq_len, packing=True)
    assert stats.examples == 2 and stats.truncated_rows == 0
    assert examples[0]["input_ids"] == rendered[0][0] + rendered[1][0]
    assert examples[0]["labels"] == rendered[0][1] + rendered[1][1]
    assert examples[0]["position_ids"] == list(range(lengths[0])) + list(range(lengths[1]))
    assert examples[1]["input_ids"] == rendered[2][0][:seq_len]
    assert stats.trained_tokens == sum(sum(1 for x in e["labels"] if x != IGNORE) for e in examples)
    unpacked, _ = data.build_examples(FIXTURE, seq_len)
    assert len(unpacked) == 3


def test_drop_analysis_option(tmp_path):
    keep, _ = data.build_examples(FIXTURE, None)
    drop, _ = data.build_examples(FIXTURE, None, drop_analysis=True)
    rows = data.load_rows(FIXTURE)
    for k, d, row in zip(keep, drop, rows):
        assert len(d["input_ids"]) < len(k["input_ids"])  # every fixture row thinks before answering
        assert d["input_ids"] == render_row(row, drop_analysis=True)[0]
        assert k["input_ids"] == render_row(row)[0]
