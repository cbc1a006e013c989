"""``ossforge demo``: held-out prompts, harmony parsing of generated tool calls, the CLI on a real run."""

from __future__ import annotations

import json

import pytest

from ossforge.finetune.demo import held_out_prompts, read_reply, render_prompt
from ossforge.model import tokenizer as tok
from tests.conftest import run_cli
from tests.test_train import DATA, write_config


def _reference_tokens(prompt, line: int) -> list[int]:
    """The tokens the dataset's first assistant turn renders to, after the prompt."""
    from ossforge.finetune.harmony import render_row

    row = json.loads(DATA.read_text().splitlines()[line - 1])
    ids, _ = render_row(row)
    start = len(render_prompt(prompt))
    return ids[start:ids.index(tok.CALL, start) + 1]


def test_reference_reply_is_a_well_formed_matching_call():
    prompts = held_out_prompts(str(DATA))
    prompt = next(p for p in prompts if p.reference)
    line = int(prompt.where.rsplit(":", 1)[1])
    reply = read_reply(_reference_tokens(prompt, line), prompt)
    assert reply.addressed and reply.well_formed and reply.matches
    assert reply.calls == [("dose", prompt.reference[0][1])]
    assert "<|call|>" in reply.text


def test_wrong_or_broken_calls_are_not_counted():
    prompt = next(p for p in held_out_prompts(str(DATA)) if p.reference)
    line = int(prompt.where.rsplit(":", 1)[1])
    good = _reference_tokens(prompt, line)
    text = tok.decode(good)
    wrong_args = text.replace(json.dumps(prompt.reference[0][1]), '{"kg": 1234}')
    assert wrong_args != text
    reply = read_reply(tok.harmony_encoding().encode(wrong_args, allowed_special="all"), prompt)
    assert reply.well_formed and not reply.matches
    broken = text.replace(json.dumps(prompt.reference[0][1]), '{"kg": 12')
    assert not read_reply(tok.harmony_encoding().encode(broken, allowed_special="all"), prompt).well_formed
    unknown_tool = text.replace("functions.dose", "functions.nope")
    unknown = read_reply(tok.harmony_encoding().encode(unknown_tool, allowed_special="all"), prompt)
    assert not unknown.well_formed and not unknown.addressed
    assert not read_reply(tok.encode_text("hello there"), prompt).well_formed


@pytest.mark.slow
def test_demo_cli_on_a_trained_run(tmp_path):
    from tests.test_train import train_in_process

    train_in_process(write_config(tmp_path, "run", max_steps=2))
    proc = run_cli("demo", str(tmp_path / "run"), "--score", "1", "--max-new-tokens", "6")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "held-out prompt" in proc.stdout and "tuned model" in proc.stdout and "base model" in proc.stdout
    assert "on 1 held-out prompts that need a tool call" in proc.stdout and "well-formed (JSON arguments)" in proc.stdout
    proc = run_cli("demo", str(tmp_path / "nothing-here"))
    assert proc.returncode == 2 and proc.stderr.startswith("error: ")
