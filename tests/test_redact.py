"""PII redaction (libphonenumber, python-stdnum checksums, rules with word boundaries) and opt-in traces."""

from __future__ import annotations

import io
import json
import os
import re
import stat
import subprocess
import sys

import pytest

from ossforge.agents import ChatGptOss, ScriptedBackend
from ossforge.agents.loop import build_domain_agent
from ossforge.agents.trace import NoTrace, Trace, find_pii, names_detected, redact

# (text around the identifier has no digits, so any 3-digit run left in the output is a leak)
PII = [
    ("SSN 123-45-6789", "[SSN]"), ("social security number 078051120", "[SSN]"),
    ("IP 192.168.1.20", "[IP]"), ("from 10.0.0.254.", "[IP]"),
    ("host 2001:db8::8a2e:370:7334 down", "[IP]"), ("bound to fe80::1ff:fe23:4567:890a%eth0", "[IP]"),
    ("write to jane.doe+clinic@example.co.uk", "[EMAIL]"),
    ("call +44 20 7946 0958 now", "[PHONE]"), ("call +44 (0)20 7946 0958", "[PHONE]"),
    ("phone (415) 555-2671", "[PHONE]"), ("mobile 555-201-7788", "[PHONE]"), ("tel +1-415-555-2671", "[PHONE]"),
    ("ring +33 1 42 68 53 00", "[PHONE]"), ("ring +49 (0) 30 901820", "[PHONE]"), ("ring 0049 30 901820", "[PHONE]"),
    ("ring +91 98765 43210", "[PHONE]"), ("ring +81 3-1234-5678", "[PHONE]"), ("ring +55 11 91234-5678", "[PHONE]"),
    ("ring +234 803 123 4567", "[PHONE]"), ("text me on 07700 900123", "[PHONE]"), ("dial 415.555.2671", "[PHONE]"),
    ("card 4111 1111 1111 1111 please", "[CARD]"), ("card 4111-1111-1111-1111", "[CARD]"),
    ("amex 378282246310005", "[CARD]"), ("mastercard 5555555555554444", "[CARD]"),
    ("NHS number 943 476 5919", "[NHS]"), ("nhs no: 401-023-2137", "[NHS]"), ("ref 9434765919 on file", None),
    ("MRN: 00123456", "[RECORD]"), ("medical record number A1234567", "[RECORD]"), ("patient ID 88-1234", "[RECORD]"),
    ("hospital number RX-448812", "[RECORD]"),
    ("DOB 1985-03-12", "[DOB]"), ("date of birth: 12 March 1985", "[DOB]"), ("born on March 12th, 1985", "[DOB]"),
    ("d.o.b. 04/05/1950", "[DOB]"), ("birthdate is 4.5.1950", "[DOB]"),
    ("lives at 221B Baker Street", "[ADDRESS]"), ("sent to 1600 Pennsylvania Avenue NW, Apt 4", "[ADDRESS]"),
    ("PO Box 12345", "[ADDRESS]"),
    ("postcode SW1A 1AA", "[POSTCODE]"), ("London EC1A 1BB", "[POSTCODE]"), ("Springfield, IL 62704", "[POSTCODE]"),
    ("zip code 90210-1234", "[POSTCODE]"),
]


@pytest.mark.parametrize("text,tag", PII)
def test_identifier_redacted_whole(text, tag):
    out = redact(text)
    if tag:
        assert tag in out, out
    assert re.search(r"\d{3}", out) is None, f"digits leaked: {out!r}"
    assert re.search(r"\d", out) is None, f"digits left: {out!r}"


def test_known_bugs_fixed_exactly():
    assert redact("SSN 123-45-6789") == "SSN [SSN]"
    assert redact("IP 192.168.1.20") == "IP [IP]"
    assert redact("MRN: 00123456") == "[RECORD]"
    assert redact("DOB 1985-03-12") == "[DOB]"


@pytest.mark.parametrize("text", [
    "give 1000 mg every 6 h, max 4000 mg; 15 mg/kg for 20.5 kg",
    "10 mg/kg twice daily, 2.5 mL of 120 mg/5 mL suspension",
    "Hb 13.5 g/dL, WBC 11.2 x10^9/L, platelets 250000, BP 120/80, HR 88, SpO2 97%",
    "glucose 5.6 mmol/L at 08:30 on 2026-03-12",
    "appointment on 12/03/2026 at 10:30, follow-up 3 March 2027",
    "Take 2 tablets 3 times a day for 5 days; review in 6 weeks",
    "version 2.10.3, ratio 1:2:3, 10:30:00, year 1985, room 12",
    "Solve 2x + 3 = 7, then 37 * 4 = 148",
])
def test_non_pii_stays_readable(text):
    assert redact(text) == text


def test_clinical_note_mixed():
    note = ("Pt DOB 04/05/1950, MRN 88812345, NHS number 943 476 5919, jim@example.org, +44 20 7946 0958, "
            "lives at 12 Acacia Avenue, Leeds LS1 4AP. Seen 12/03/2026: Hb 13.5 g/dL; paracetamol 15 mg/kg.")
    out = redact(note)
    for tag in ("[DOB]", "[RECORD]", "[NHS]", "[EMAIL]", "[PHONE]", "[ADDRESS]", "[POSTCODE]"):
        assert tag in out, out
    for secret in ("04/05/1950", "888", "943", "5919", "jim@", "7946", "0958", "Acacia", "LS1"):
        assert secret not in out
    assert "Seen 12/03/2026: Hb 13.5 g/dL; paracetamol 15 mg/kg." in out


def test_overlapping_detections_merge_into_one_span():
    spans = find_pii("DOB 1985-03-12")  # the phone matcher also sees digits inside it
    assert [(s.start, s.end, s.tag) for s in spans] == [(0, 14, "[DOB]")]


def test_names_need_an_ner_pipeline(tmp_path, monkeypatch):
    """Without an NER pipeline names pass through (documented); with one (here a rule-based spaCy pipeline
    saved to disk and named by OSSFORGE_PII_NER_MODEL) PERSON entities become [NAME]."""
    from ossforge.agents import trace

    spacy = pytest.importorskip("spacy")  # the pii-ner extra (also in dev)
    text = "Dr Jane Smith saw the patient on ward 5"
    monkeypatch.setenv("OSSFORGE_PII_NER_MODEL", str(tmp_path / "missing"))
    trace._ner_pipeline.cache_clear()
    assert not names_detected() and redact(text) == text
    nlp = spacy.blank("en")
    nlp.add_pipe("entity_ruler").add_patterns([{"label": "PERSON", "pattern": [{"TEXT": "Jane"}, {"TEXT": "Smith"}]}])
    nlp.to_disk(tmp_path / "ner")
    monkeypatch.setenv("OSSFORGE_PII_NER_MODEL", str(tmp_path / "ner"))
    trace._ner_pipeline.cache_clear()
    try:
        assert names_detected()
        assert redact(text) == "Dr [NAME] saw the patient on ward 5"
        assert redact("Jane Smith, MRN 445566") == "[NAME], [RECORD]"
    finally:
        trace._ner_pipeline.cache_clear()


def test_trace_file_is_private_and_redacted(tmp_path):
    path = tmp_path / "sub" / "t.jsonl"
    trace = Trace(path)
    trace.log("user", content="my phone is +44 20 7946 0958", nested={"ip": ["192.168.1.20"]})
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    (row,) = [json.loads(x) for x in path.read_text().splitlines()]
    assert row["content"] == "my phone is [PHONE]" and row["nested"] == {"ip": ["[IP]"]}
    buf = io.StringIO()
    Trace(buf).log("user", content="mail a@b.co")
    assert json.loads(buf.getvalue())["content"] == "mail [EMAIL]"


def _agent(trace):
    final = "<|channel|>final<|message|>Please seek care.<|return|>"
    return build_domain_agent("medicine", ChatGptOss(backend=ScriptedBackend([final])), trace=trace)


def test_agent_traces_only_when_asked(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    agent = _agent(None)
    assert isinstance(agent.trace, NoTrace)
    agent.run("my email is jim@example.org")
    assert list(tmp_path.iterdir()) == []
    path = tmp_path / "t.jsonl"
    _agent(str(path)).run("my email is jim@example.org")
    text = path.read_text()
    assert "[EMAIL]" in text and "jim@" not in text


def test_chat_cli_writes_no_trace_unless_asked(tmp_path):
    """``ossforge chat`` with HOME in a fresh folder: nothing is written anywhere unless --trace is given."""
    from ossforge.model.tokenizer import ensure_tiktoken_base

    home, work = tmp_path / "home", tmp_path / "work"
    home.mkdir(), work.mkdir()
    script = tmp_path / "script.json"
    script.write_text(json.dumps(["<|channel|>final<|message|>Give 200 mg.<|return|>"] * 2))
    env = {k: v for k, v in os.environ.items() if k not in ("OSSFORGE_CACHE", "XDG_CACHE_HOME")}
    env.update(HOME=str(home), TIKTOKEN_ENCODINGS_BASE=str(ensure_tiktoken_base()))

    def chat(*extra):
        return subprocess.run([sys.executable, "-m", "ossforge", "chat", "--domain", "medicine", "--scripted",
                               str(script), *extra], cwd=work, env=env, input="dose for jim@example.org?\n",
                              capture_output=True, text=True, timeout=300)

    r = chat()
    assert r.returncode == 0, r.stderr
    assert "Give 200 mg." in r.stdout
    written = [p for p in (*home.rglob("*"), *work.rglob("*"))]
    assert written == [], written
    trace = tmp_path / "asked.jsonl"
    r = chat("--trace", str(trace))
    assert r.returncode == 0, r.stderr
    events = [json.loads(x) for x in trace.read_text().splitlines()]
    assert events[0] == {**events[0], "event": "user", "content": "dose for [EMAIL]?"}
    assert [p for p in home.rglob("*")] == []


def test_chat_cli_unwritable_trace_is_a_user_error(tmp_path):
    script = tmp_path / "script.json"
    script.write_text(json.dumps(["<|channel|>final<|message|>Hi.<|return|>"]))
    blocker = tmp_path / "file"
    blocker.write_text("")
    r = subprocess.run([sys.executable, "-m", "ossforge", "chat", "--domain", "education", "--scripted", str(script),
                        "--trace", str(blocker / "t.jsonl")], input="hi\n", capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and r.stderr.startswith(f"error: {blocker / 't.jsonl'}: --trace:"), r.stderr
    assert "Traceback" not in r.stderr
