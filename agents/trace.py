"""A local JSONL trace of every agent step, with personal data redacted before it is written.

Redacted: email addresses, phone numbers, medical record / patient numbers, dates of birth (and
any other full calendar date). Doses such as ``1000 mg`` or ``15 mg/kg`` are left alone.
"""

from __future__ import annotations

import json
import re
import threading
import time
from pathlib import Path
from typing import Any

_MONTHS = r"(?:jan|feb|mar|apr|may|jun|jul|aug|sep|sept|oct|nov|dec)[a-z]*\.?"
_DATE = (rf"(?:\d{{4}}-\d{{1,2}}-\d{{1,2}}|\d{{1,2}}[/.-]\d{{1,2}}[/.-]\d{{2,4}}"
         rf"|\d{{1,2}}(?:st|nd|rd|th)?\s+{_MONTHS},?\s+\d{{4}}|{_MONTHS}\s+\d{{1,2}}(?:st|nd|rd|th)?,?\s+\d{{4}})")

_RULES: list[tuple[re.Pattern, str]] = [
    (re.compile(r"[\w.+-]+@[\w-]+(?:\.[\w-]+)+"), "[EMAIL]"),
    (re.compile(rf"\b(?:dob|d\.o\.b\.?|date of birth|born(?: on)?)\s*[:\-]?\s*{_DATE}", re.IGNORECASE), "[DOB]"),
    (re.compile(_DATE, re.IGNORECASE), "[DATE]"),
    (re.compile(r"\b(?:mrn|medical record(?: number| no\.?)?|record (?:number|no\.?|#)|patient (?:id|number|no\.?)"
                r"|nhs (?:number|no\.?)|chart (?:number|no\.?|#)|hospital (?:number|no\.?))\s*[:#]?\s*[A-Z0-9][A-Z0-9-]{3,}",
                re.IGNORECASE), "[RECORD]"),
    (re.compile(r"(?<![\w.])\+?\d[\d ().-]{6,}\d(?![\w.])"), "[PHONE]"),
]


def redact(text: str) -> str:
    """``text`` with emails, phone numbers, record numbers and dates of birth replaced by tags."""
    for rx, tag in _RULES:
        text = rx.sub(lambda m: tag if _digits(m.group(0)) >= _min_digits(tag) else m.group(0), text)
    return text


def _digits(s: str) -> int:
    return sum(c.isdigit() for c in s)


def _min_digits(tag: str) -> int:
    return 7 if tag == "[PHONE]" else 0


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
    """Appends one redacted JSON object per event to ``path`` (None: keeps events in memory only)."""

    def __init__(self, path: str | Path | None = None):
        self.path = Path(path) if path else None
        self.events: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        if self.path:
            self.path.parent.mkdir(parents=True, exist_ok=True)

    def log(self, event: str, **data: Any) -> dict[str, Any]:
        record = redact_obj({"ts": round(time.time(), 3), "event": event, **data})
        with self._lock:
            self.events.append(record)
            if self.path:
                with self.path.open("a", encoding="utf-8") as f:
                    f.write(json.dumps(record, ensure_ascii=False, default=str) + "\n")
        return record
