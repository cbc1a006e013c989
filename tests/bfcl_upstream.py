"""BFCL's own v4 data and AST checker, from the ``bfcl-eval`` wheel on PyPI (test fixture).

The wheel is downloaded with ``pip download --no-deps`` (``make install`` does it into
``.venv/bfcl``; a missing copy is fetched here) and never installed: its dependencies are every
model vendor's SDK. Its data files are read from the zip, and its checker modules are executed from
the zip with the two imports that would pull those SDKs (``model_config``) replaced by a small stand-in.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import types
import zipfile
from pathlib import Path

BFCL_VERSION = "2026.3.23"
REPO = Path(__file__).resolve().parents[1]
WHEEL_DIR = REPO / ".venv" / "bfcl"
CATEGORIES = ["simple_python", "multiple", "parallel", "parallel_multiple", "live_simple", "live_multiple",
              "live_parallel", "live_parallel_multiple", "irrelevance", "live_irrelevance"]


def wheel() -> Path:
    """Path of the bfcl-eval wheel, downloaded once (atomically: xdist workers may race)."""
    name = f"bfcl_eval-{BFCL_VERSION}-py3-none-any.whl"
    path = WHEEL_DIR / name
    if path.is_file():
        return path
    WHEEL_DIR.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=WHEEL_DIR) as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", f"bfcl-eval=={BFCL_VERSION}",
                        "-d", tmp], check=True, timeout=600)
        os.replace(Path(tmp) / name, path)
    return path


def extract_data(dest: Path) -> Path:
    """``bfcl_eval/data`` question and possible-answer files of the categories above, under ``dest``."""
    with zipfile.ZipFile(wheel()) as z:
        for c in CATEGORIES:
            for member in (f"bfcl_eval/data/BFCL_v4_{c}.json", f"bfcl_eval/data/possible_answer/BFCL_v4_{c}.json"):
                if member in z.namelist():
                    z.extract(member, dest)
    return dest / "bfcl_eval" / "data"


def category_files(data: Path, category: str) -> tuple[Path, Path | None]:
    answers = data / "possible_answer" / f"BFCL_v4_{category}.json"
    return data / f"BFCL_v4_{category}.json", answers if answers.is_file() else None


def load_checker():
    """BFCL's ``ast_checker`` function and its ``Language`` enum, executed from the wheel."""
    modules = {
        "bfcl_eval.constants.enums": "bfcl_eval/constants/enums.py",
        "bfcl_eval.constants.type_mappings": "bfcl_eval/constants/type_mappings.py",
        "bfcl_eval.eval_checker.ast_eval.type_convertor.java_type_converter":
            "bfcl_eval/eval_checker/ast_eval/type_convertor/java_type_converter.py",
        "bfcl_eval.eval_checker.ast_eval.type_convertor.js_type_converter":
            "bfcl_eval/eval_checker/ast_eval/type_convertor/js_type_converter.py",
        "bfcl_eval.eval_checker.ast_eval.ast_checker": "bfcl_eval/eval_checker/ast_eval/ast_checker.py",
    }
    for package in ("bfcl_eval", "bfcl_eval.constants", "bfcl_eval.eval_checker", "bfcl_eval.eval_checker.ast_eval",
                    "bfcl_eval.eval_checker.ast_eval.type_convertor"):
        sys.modules.setdefault(package, types.ModuleType(package)).__path__ = []

    class _Mapping(dict):  # every model name: an OpenAI-style FC model, "." in names sent as "_"
        def __missing__(self, key):
            return types.SimpleNamespace(underscore_to_dot=True)

    config = types.ModuleType("bfcl_eval.constants.model_config")
    config.MODEL_CONFIG_MAPPING = _Mapping()
    sys.modules[config.__name__] = config
    with zipfile.ZipFile(wheel()) as z:
        for name, member in modules.items():
            module = types.ModuleType(name)
            exec(compile(z.read(member).decode(), f"{wheel().name}/{member}", "exec"), module.__dict__)
            sys.modules[name] = module
    checker = sys.modules["bfcl_eval.eval_checker.ast_eval.ast_checker"]
    return checker.ast_checker, sys.modules["bfcl_eval.constants.enums"].Language


def read_json_lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
