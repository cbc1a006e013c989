"""An opt-in JSONL trace of every agent step, with personal data redacted before it is written.

Nothing is traced unless a trace is asked for (``ossforge chat --trace FILE``, ``Agent(trace=...)``).

What ``redact`` replaces (without any model): email addresses [EMAIL]; phone numbers in national and
international formats [PHONE] (Google's libphonenumber, via ``phonenumbers``); US social security
numbers [SSN]; NHS numbers [NHS] (mod-11 checksum, or any number after "NHS number"); medical record /
patient / hospital numbers after such a label [RECORD]; dates of birth after "DOB", "date of birth",
"born" [DOB]; IPv4 and IPv6 addresses [IP] (checked by ``ipaddress``); payment card numbers [CARD]
(Luhn checksum, ``python-stdnum``); UK postcodes and US ZIP codes after a state or "ZIP" [POSTCODE];
street addresses ("221B Baker Street", "PO Box 12") [ADDRESS]. Person names [NAME] only when spaCy and
an English pipeline with NER are installed (``pip install 'ossforge[pii-ner]'`` and
``python -m spacy download en_core_web_sm``); without one, names pass through unchanged.

Doses ("15 mg/kg"), lab values ("Hb 13.5 g/dL"), times and dates that are not a date of birth stay.
Overlapping detections are merged and replaced whole, so no part of an identifier is left behind.
"""

from __future__ import annotations

import functools
import importlib.util
import ipaddress
import json
import os
import re
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Iterator

import phonenumbers
from stdnum import luhn
from stdnum.gb import nhs
from stdnum.us import ssn

PHONE_REGIONS = ("US", "GB")  # how numbers without a +country code are read; "+.." numbers work for every country


@dataclass(frozen=True)
class Span:
    start: int
    end: int
    tag: str
    priority: int  # which tag names a merged span: context-labelled > checksum-verified > pattern only


# ---------------------------------------------------------------- detectors (hand-written rules where no
# maintained library fits: email/record/DOB/postcode/address shapes; numbers are checked by libraries)

_EMAIL = re.compile(r"(?<![\w.+-])[\w.+-]+@[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?(?:\.[A-Za-z0-9-]+)+")


def _emails(text: str) -> Iterator[Span]:
    for m in _EMAIL.finditer(text):
        yield Span(m.start(), m.end(), "[EMAIL]", 4)


_IPV4 = re.compile(r"(?<![\d.])(?:\d{1,3}\.){3}\d{1,3}(?!\.?\d)")
_IPV6 = re.compile(r"(?<![\w:.])(?:[0-9A-Fa-f]{0,4}:){2,7}(?:\d{1,3}(?:\.\d{1,3}){3}|[0-9A-Fa-f]{0,4})(?:%\w+)?(?![\w:])")


def _ips(text: str) -> Iterator[Span]:
    for rx, cls in ((_IPV4, ipaddress.IPv4Address), (_IPV6, ipaddress.IPv6Address)):
        for m in rx.finditer(text):
            try:
                cls(m.group(0).split("%")[0])
            except ValueError:
                continue
            yield Span(m.start(), m.end(), "[IP]", 4)


_DIGIT_GROUPS = re.compile(r"(?<![\d.])\d+(?:[ -]\d+)+(?![\d])|(?<![\d.])\d{13,19}(?!\d)")


def _cards(text: str) -> Iterator[Span]:
    """13-19 digits in groups (``4111 1111 1111 1111``) that pass the Luhn check."""
    for m in _DIGIT_GROUPS.finditer(text):
        groups = [(g.start() + m.start(), g.end() + m.start()) for g in re.finditer(r"\d+", m.group(0))]
        for i in range(len(groups)):
            for j in range(i, len(groups)):
                digits = "".join(text[a:b] for a, b in groups[i:j + 1])
                if len(digits) > 19:
                    break
                if len(digits) >= 13 and luhn.is_valid(digits):
                    yield Span(groups[i][0], groups[j][1], "[CARD]", 4)


_SSN_SHAPE = re.compile(r"(?<![\d-])\d{3}([- ])\d{2}\1\d{4}(?![\d-])")
_SSN_LABELLED = re.compile(r"\b(?:ssn|social security(?: number| no\.?)?)\s*[:#]?\s*(\d{9}|\d{3}[- ]\d{2}[- ]\d{4})\b",
                           re.IGNORECASE)


def _ssns(text: str) -> Iterator[Span]:
    for m in _SSN_SHAPE.finditer(text):  # the 3-2-4 shape is an SSN's (valid per SSA rules or not)
        yield Span(m.start(), m.end(), "[SSN]", 5 if ssn.is_valid(m.group(0)) else 3)
    for m in _SSN_LABELLED.finditer(text):
        yield Span(m.start(1), m.end(1), "[SSN]", 5)


_NHS_SHAPE = re.compile(r"(?<![\d-])\d{3}[- ]?\d{3}[- ]?\d{4}(?![\d-])")
_NHS_LABELLED = re.compile(r"\bnhs\s*(?:number|no\.?|#)?\s*[:#]?\s*(\d[\d -]{8,12}\d)", re.IGNORECASE)


def _nhs_numbers(text: str) -> Iterator[Span]:
    for m in _NHS_LABELLED.finditer(text):
        yield Span(m.start(1), m.end(1), "[NHS]", 5)
    for m in _NHS_SHAPE.finditer(text):
        if nhs.is_valid(m.group(0)):  # a checksum-valid 10-digit number could also be a phone: low priority
            yield Span(m.start(), m.end(), "[NHS]", 2)


_RECORD = re.compile(
    r"\b(?:mrn|medical record(?: number| no\.?| #)?|(?:health |case |chart |hospital |patient )?record"
    r"(?: number| no\.?| #)|patient (?:id|number|no\.?|#)|hospital (?:number|no\.?|id)|chart (?:number|no\.?|#)"
    r"|case (?:number|no\.?|#))\s*(?:is\s+)?[:#]?\s*[A-Z0-9][A-Z0-9/-]*\d[A-Z0-9/-]*", re.IGNORECASE)


def _records(text: str) -> Iterator[Span]:
    for m in _RECORD.finditer(text):
        yield Span(m.start(), m.end(), "[RECORD]", 5)


_MONTHS = r"(?:jan|feb|mar|apr|may|jun|jul|aug|sep|sept|oct|nov|dec)[a-z]*\.?"
_DATE = (rf"(?:\d{{4}}[-/.]\d{{1,2}}[-/.]\d{{1,2}}|\d{{1,2}}[/.-]\d{{1,2}}[/.-]\d{{2,4}}"
         rf"|\d{{1,2}}(?:st|nd|rd|th)?(?:\s+of)?\s+{_MONTHS},?\s+\d{{4}}|{_MONTHS}\s+\d{{1,2}}(?:st|nd|rd|th)?,?\s+\d{{4}})")
_DOB = re.compile(rf"\b(?:dob|d\.o\.b\.?|date of birth|birth ?date|born(?: on)?)\s*(?:is\s+|was\s+)?[:=\-]?\s*"
                  rf"(?<![\d.]){_DATE}(?![./-]?\d)", re.IGNORECASE)


def _dobs(text: str) -> Iterator[Span]:
    for m in _DOB.finditer(text):
        yield Span(m.start(), m.end(), "[DOB]", 5)


_UK_POSTCODE = re.compile(r"\b(?:GIR ?0AA|[A-PR-UWYZ][A-HK-Y]?\d[A-Z\d]? ?\d[ABD-HJLNP-UW-Z]{2})\b", re.IGNORECASE)
_STATES = ("AL AK AZ AR CA CO CT DE DC FL GA HI ID IL IN IA KS KY LA ME MD MA MI MN MS MO MT NE NV NH NJ NM NY NC "
           "ND OH OK OR PA RI SC SD TN TX UT VT VA WA WV WI WY PR").split()
_US_ZIP = re.compile(rf"(?:\b(?:{'|'.join(_STATES)}),?\s+|\bzip(?: ?code)?\s*[:#]?\s*)(\d{{5}}(?:-\d{{4}})?)(?!\d)")


def _postcodes(text: str) -> Iterator[Span]:
    for m in _UK_POSTCODE.finditer(text):
        if any(c.isdigit() for c in m.group(0)) and any(c.isalpha() for c in m.group(0)[-2:]):
            yield Span(m.start(), m.end(), "[POSTCODE]", 3)
    for m in _US_ZIP.finditer(text):
        yield Span(m.start(1), m.end(1), "[POSTCODE]", 3)


_STREET_TYPES = ("street|st|road|rd|avenue|ave|lane|ln|drive|dr|boulevard|blvd|court|ct|close|way|place|pl|terrace"
                 "|crescent|square|sq|parkway|pkwy|highway|hwy|circle|row|gardens|grove|mews|walk|alley|trail")
_ADDRESS = re.compile(
    rf"\b\d{{1,5}}[A-Za-z]?,?\s+(?:[A-Z][A-Za-z'.-]*\s+){{1,4}}(?i:{_STREET_TYPES})\b\.?"
    rf"(?:\s+(?:N|S|E|W|NE|NW|SE|SW)\b)?(?:,?\s+(?i:apt|apartment|suite|unit|flat|fl)\.?\s*#?\s*\w+)?"
    rf"|\b(?i:p\.?\s?o\.?\s+box)\s+\d+")


def _addresses(text: str) -> Iterator[Span]:
    for m in _ADDRESS.finditer(text):
        yield Span(m.start(), m.end(), "[ADDRESS]", 3)


_DATE_ONLY = re.compile(rf"^{_DATE}$|^\d{{1,2}}:\d{{2}}(?::\d{{2}})?$", re.IGNORECASE)


def _phones(text: str) -> Iterator[Span]:
    """libphonenumber's matcher, permissive (fictional 555 numbers are numbers too), >= 7 digits, not dates."""
    for region in PHONE_REGIONS:
        for m in phonenumbers.PhoneNumberMatcher(text, region, leniency=phonenumbers.Leniency.POSSIBLE):
            raw = m.raw_string
            if sum(c.isdigit() for c in raw) >= 7 and not _DATE_ONLY.match(raw.strip()):
                yield Span(m.start, m.end, "[PHONE]", 3)


@functools.lru_cache(maxsize=1)
def _ner_pipeline():
    """A spaCy pipeline with NER, if one is installed (``OSSFORGE_PII_NER_MODEL`` names it); else None."""
    names = [os.environ["OSSFORGE_PII_NER_MODEL"]] if os.environ.get("OSSFORGE_PII_NER_MODEL") else \
        ["en_core_web_sm", "en_core_web_md", "en_core_web_lg", "en_core_web_trf"]
    names = [n for n in names if Path(n).is_dir() or (n.isidentifier() and importlib.util.find_spec(n))]
    if not names:  # importing spaCy takes seconds: only when there is a pipeline to load
        return None
    try:
        import spacy
    except ImportError:
        return None
    for name in names:
        try:
            nlp = spacy.load(name)
        except OSError:
            continue
        if "ner" in nlp.pipe_names or "entity_ruler" in nlp.pipe_names:
            return nlp
    return None


def names_detected() -> bool:
    """Whether person names are redacted (an NER pipeline is installed)."""
    return _ner_pipeline() is not None


def _names(text: str) -> Iterator[Span]:
    nlp = _ner_pipeline()
    if nlp is None:
        return
    for ent in nlp(text).ents:
        if ent.label_ in ("PERSON", "PER"):
            yield Span(ent.start_char, ent.end_char, "[NAME]", 1)


DETECTORS = (_emails, _ips, _cards, _ssns, _nhs_numbers, _records, _dobs, _postcodes, _addresses, _phones, _names)


def find_pii(text: str) -> list[Span]:
    """Non-overlapping spans to replace: overlapping detections merged, named by the highest priority."""
    spans = sorted((s for detect in DETECTORS for s in detect(text)), key=lambda s: (s.start, -s.end))
    merged: list[Span] = []
    for s in spans:
        if merged and s.start < merged[-1].end:
            last = merged[-1]
            best = max((last, s), key=lambda x: (x.priority, x.end - x.start))
            merged[-1] = Span(last.start, max(last.end, s.end), best.tag, best.priority)
        else:
            merged.append(s)
    return merged


def redact(text: str) -> str:
    """``text`` with personal identifiers replaced by tags such as ``[PHONE]`` (see the module docstring)."""
    out, pos = [], 0
    for s in find_pii(text):
        out += [text[pos:s.start], s.tag]
        pos = s.end
    out.append(text[pos:])
    return "".join(out)


def redact_obj(obj: Any) -> Any:
    """Redact every string inside dicts/lists."""
    if isinstance(obj, str):
        return redact(obj)
    if isinstance(obj, dict):
        return {k: redact_obj(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [redact_obj(v) for v in obj]
    return obj


class Trace:
    """Appends one redacted JSON object per event to ``target``: a file path (created private, mode
    0600, and appended to) or an open text stream; None keeps the events in memory only."""

    def __init__(self, target: str | Path | IO[str] | None = None):
        self.stream = target if hasattr(target, "write") else None
        self.path = Path(target) if target is not None and self.stream is None else None
        self.events: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        if self.path:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            os.close(os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600))

    def log(self, event: str, **data: Any) -> dict[str, Any]:
        record = redact_obj({"ts": round(time.time(), 3), "event": event, **data})
        line = json.dumps(record, ensure_ascii=False, default=str) + "\n"
        with self._lock:
            self.events.append(record)
            if self.path:
                with self.path.open("a", encoding="utf-8") as f:
                    f.write(line)
            elif self.stream is not None:
                self.stream.write(line)
                self.stream.flush()
        return record


class NoTrace:
    """What an agent uses when no trace was asked for: records nothing, anywhere."""

    path = None
    events: tuple = ()

    def log(self, event: str, **data: Any) -> dict[str, Any]:
        return {}


def as_trace(trace: "Trace | NoTrace | str | Path | IO[str] | None") -> "Trace | NoTrace":
    """``Agent(trace=...)``: None -> no tracing; a path or stream -> a redacting :class:`Trace`."""
    if trace is None:
        return NoTrace()
    if isinstance(trace, (Trace, NoTrace)) or hasattr(trace, "log"):
        return trace
    return Trace(trace)
