"""``ossforge data check`` and ``ossforge data render`` through the real command line."""

from __future__ import annotations

import json
from pathlib import Path

from ossforge.finetune import data
from ossforge.finetune.harmony import render_row
from tests.conftest import run_cli

FIXTURE = Path(__file__).parent / "fixtures" / "data" / "valid.jsonl"
GOOD = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}


def test_check_ok():
    res = run_cli("data", "check", str(FIXTURE))
    assert res.returncode == 0, res.stderr
    assert f"{FIXTURE}: 3 rows OK" in res.stdout
    assert "trained" in res.stdout


def test_check_reports_every_bad_row(tmp_path):
    bad = tmp_path / "bad.jsonl"
    lines = [
        json.dumps(GOOD),
        '{"messages": [',
        json.dumps({"messages": [{"role": "robot", "content": "x"}, {"role": "assistant", "content": "y"}]}),
        json.dumps({**GOOD, "reasoning_effort": "ultra"}),
        json.dumps({"messages": [{"role": "user", "content": "x"}]}),
        json.dumps({"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "tool_calls": [
            {"type": "function", "function": {"name": "nope", "arguments": {}}}]}]}),
        json.dumps({"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "tool_calls": [
            {"type": "function", "function": {"name": "f", "arguments": "{not json"}}]}],
            "tools": [{"name": "f", "description": "d"}]}),
    ]
    bad.write_text("\n".join(lines) + "\n")
    res = run_cli("data", "check", str(bad))
    assert res.returncode == 2
    assert "Traceback" not in res.stderr
    errors = [line for line in res.stderr.splitlines() if line.startswith("error: ")]
    assert [e.split(": ")[1] for e in errors] == [f"{bad}:{n}" for n in (2, 3, 4, 5, 6, 7)]
    for reason in ("bad JSON", "unknown role 'robot'", "reasoning_effort", "no assistant message",
                   "'nope' which is not in tools", "arguments: not valid JSON"):
        assert reason in res.stderr
    assert "6 bad rows, 1 OK" in res.stderr


def test_render_matches_python_and_is_atomic(tmp_path):
    out = tmp_path / "out" / "rendered.jsonl"
    res = run_cli("data", "render", str(FIXTURE), "--out", str(out))
    assert res.returncode == 0, res.stderr
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    want = [render_row(r) for r in data.load_rows(FIXTURE)]
    assert [(d["input_ids"], d["labels"]) for d in lines] == want
    assert set(lines[0]) == {"input_ids", "labels"}
    assert sorted(p.name for p in out.parent.iterdir()) == ["rendered.jsonl"]  # no temp file left


def test_render_with_config_truncates(tmp_path):
    lengths = [len(render_row(r)[0]) for r in data.load_rows(FIXTURE)]
    seq_len = max(lengths) - 10
    config = tmp_path / "c.yaml"
    config.write_text(f"model: {{preset: tiny}}\ndata: {{train: {FIXTURE}}}\ntraining: {{seq_len: {seq_len}}}\n")
    out = tmp_path / "r.jsonl"
    res = run_cli("data", "render", str(FIXTURE), "--out", str(out), "--config", str(config))
    assert res.returncode == 0, res.stderr
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert max(len(r["input_ids"]) for r in rows) == seq_len
    assert "1 rows truncated (10 tokens cut)" in res.stdout


def test_render_bad_data_writes_nothing(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(GOOD) + "\n" + json.dumps({"messages": "nope"}) + "\n")
    out = tmp_path / "r.jsonl"
    res = run_cli("data", "render", str(bad), "--out", str(out))
    assert res.returncode == 2
    assert res.stderr.strip().splitlines()[-1].startswith(f"error: {bad}:2: messages")
    assert not out.exists() and list(tmp_path.iterdir()) == [bad]
    missing = run_cli("data", "check", str(tmp_path / "missing.jsonl"))
    assert missing.returncode == 2 and "file not found" in missing.stderr
