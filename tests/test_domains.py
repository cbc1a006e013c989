"""Domain generators: deterministic, valid, short, verifiable, held-out really held out."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from ossforge.finetune.domains import generate, write_domain
from ossforge.finetune.domains import education, medicine

REPO = Path(__file__).resolve().parents[1]
DOMAINS = ("medicine", "education")


def _calls(row):
    return [c["function"] for m in row["messages"] if m["role"] == "assistant" for c in m.get("tool_calls", [])]


@pytest.mark.parametrize("domain", DOMAINS)
def test_shipped_files_equal_regeneration(domain, tmp_path):
    """`python -m ossforge.finetune.domains DOMAIN --out DIR` reproduces data/DOMAIN byte for byte."""
    from ossforge.finetune.domains.__main__ import main

    assert main([domain, "--out", str(tmp_path)]) == 0
    for name in ("train.jsonl", "heldout.jsonl"):
        assert (tmp_path / name).read_bytes() == (REPO / "data" / domain / name).read_bytes(), name
    assert (REPO / "data" / domain / "DATA_CARD.md").is_file()


def test_seed_changes_rows_and_is_deterministic():
    a, b, c = (generate("medicine", "train", 20, s) for s in (0, 0, 1))
    assert a == b
    assert a != c


@pytest.mark.parametrize("domain", DOMAINS)
def test_rows_are_valid_and_short(domain):
    """Every shipped row passes ossforge's validator and renders under the quickstart's 512 tokens."""
    from ossforge.finetune.data import validate_rows

    for split in ("train", "heldout"):
        good, problems = validate_rows(REPO / "data" / domain / f"{split}.jsonl")
        assert problems == []
        assert max(len(r.rendered[0]) for r in good) <= 512


@pytest.mark.parametrize("domain", DOMAINS)
def test_row_mix(domain):
    rows = generate(domain, "train", 200)
    efforts = {r["reasoning_effort"] for r in rows}
    assert efforts == {"low", "medium", "high"}
    n_calls = [len(_calls(r)) for r in rows]
    assert any(n == 0 for n in n_calls), "no-call rows"
    assert any(len(m.get("tool_calls", [])) == 2 for r in rows for m in r["messages"]), "parallel calls"
    assert any(sum(m["role"] == "user" for m in r["messages"]) == 2 for r in rows), "multi-turn"
    assert all(m.get("thinking") for r in rows for m in r["messages"] if m["role"] == "assistant")


def test_medicine_tool_results_and_arguments_are_verifiable():
    """Tool results equal the agent's dose_calc on the call's arguments; the arguments appear in the prompt."""
    from ossforge.agents.domains.medicine import dose_calc

    for r in generate("medicine", "train", 120) + generate("medicine", "heldout", 40):
        msgs = r["messages"]
        for i, m in enumerate(msgs):
            for k, c in enumerate(m.get("tool_calls", [])):
                args = c["function"]["arguments"]
                assert set(args) <= {"mg_per_kg", "weight_kg", "max_dose_mg"}
                assert msgs[i + 1 + k]["content"] == dose_calc(**args)
                user = next(u["content"] for u in reversed(msgs[:i]) if u["role"] == "user")
                assert f"{args['weight_kg']} kg" in user


def test_medicine_heldout_differs_from_train():
    train, held = generate("medicine", "train", 480), generate("medicine", "heldout", 50)
    weights = lambda rows: {c["arguments"]["weight_kg"] for r in rows for c in _calls(r)}
    assert all(w % 3 for w in weights(train)) and all(w % 3 == 0 for w in weights(held))
    first_user = lambda rows: {re.sub(r"\d+(\.\d+)?", "N", next(m["content"] for m in r["messages"] if m["role"] == "user")) for r in rows}
    assert not first_user(train) & first_user(held), "held-out prompt templates leak into training"
    drugs = lambda rows: {w for r in rows for m in r["messages"] if m["role"] == "user" for w in re.findall(r"[a-z]+", m["content"])}
    unseen = {d.name for d in medicine.HELDOUT_ONLY}
    assert not unseen & drugs(train) and unseen & drugs(held)


def test_education_results_come_from_the_agent_tool():
    from ossforge.agents.domains.education import check_step

    rows = generate("education", "train", 60) + generate("education", "heldout", 30)
    verdicts = set()
    for r in rows:
        msgs = r["messages"]
        for i, m in enumerate(msgs):
            for k, c in enumerate(m.get("tool_calls", [])):
                result = msgs[i + 1 + k]["content"]
                assert result == check_step(**c["function"]["arguments"])
                verdicts.add(result.split(":")[0])
    assert verdicts == {"correct", "incorrect"}
    assert education.evaluate("3/4 + 1/8") == education.evaluate("7/8")


def test_tools_match_the_agents_registry():
    """Training declares the tools exactly as the agents serve them."""
    from ossforge.agents.domains import education as agent_edu, medicine as agent_med

    assert medicine.TOOLS[0] in agent_med.registry().as_dataset_tools()
    assert education.TOOLS[0] in agent_edu.registry().as_dataset_tools()


def test_write_domain_counts(tmp_path):
    counts = write_domain("education", tmp_path, n_train=7, n_heldout=3)
    assert counts == {"train.jsonl": 7, "heldout.jsonl": 3}
    lines = (tmp_path / "train.jsonl").read_text().splitlines()
    assert len(lines) == 7 and all(json.loads(line)["messages"] for line in lines)


# ----------------------------------------------------------------------------- public-format loaders

FX = REPO / "tests" / "fixtures" / "public"


def _valid(rows):
    from ossforge.finetune.data import row_problem
    from ossforge.finetune.harmony import render_row

    for r in rows:
        assert row_problem(r) is None
        ids, labels = render_row(r)
        assert any(x != -100 for x in labels)


def test_medmcqa_loader():
    from ossforge.finetune.domains.loaders import load_medmcqa

    rows = load_medmcqa(FX / "medmcqa_dev.json")
    assert [r["metadata"]["answer"] for r in rows] == ["C", "B", "A"]  # original release: cop 1-4
    assert "C. Vitamin C" in rows[0]["messages"][1]["content"] and rows[0]["messages"][-1]["content"] == "Answer: C"
    assert "ascorbic" in rows[0]["messages"][-1]["thinking"]
    _valid(rows)


def test_medmcqa_parquet_is_zero_based(tmp_path):
    """The Hugging Face release (parquet, read through datasets) numbers options 0-3."""
    import datasets

    from ossforge.finetune.domains.loaders import load_medmcqa

    recs = [json.loads(line) for line in open(FX / "medmcqa_dev.json")]
    for r in recs:
        r["cop"] -= 1
    datasets.Dataset.from_list(recs).to_parquet(str(tmp_path / "validation.parquet"))
    assert [r["metadata"]["answer"] for r in load_medmcqa(tmp_path / "validation.parquet")] == ["C", "B", "A"]


def test_pubmedqa_loader_both_layouts(tmp_path):
    from ossforge.finetune.domains.loaders import load_pubmedqa

    rows = load_pubmedqa(FX / "pubmedqa_ori_pqal.json")
    assert [r["metadata"]["answer"] for r in rows] == ["yes", "no"]
    assert rows[0]["metadata"]["id"] == "90000001" and "Abstract: Sixty adults" in rows[0]["messages"][1]["content"]
    hf = tmp_path / "pqa.jsonl"
    hf.write_text(json.dumps({"pubid": 1, "question": "Q?", "context": {"contexts": ["A.", "B."]},
                              "long_answer": "L.", "final_decision": "maybe"}) + "\n")
    (row,) = load_pubmedqa(hf)
    assert row["metadata"]["answer"] == "maybe" and "Abstract: A. B." in row["messages"][1]["content"]
    _valid(rows + [row])


def test_gsm8k_loader():
    from ossforge.finetune.domains.loaders import load_gsm8k

    rows = load_gsm8k(FX / "gsm8k_test.jsonl")
    assert [r["metadata"]["answer"] for r in rows] == ["51", "210"]
    think = rows[0]["messages"][-1]["thinking"]
    assert "<<" not in think and "12 * 8 = 96 rolls" in think and "####" not in think
    _valid(rows)


def test_bfcl_loader():
    from ossforge.finetune.domains.loaders import load_bfcl

    rows = load_bfcl(FX / "BFCL_v3_simple.json", FX / "possible_answer" / "BFCL_v3_simple.json")
    simple, convert, parallel, irrelevant = rows
    (c,) = simple["messages"][-1]["tool_calls"]
    assert c["function"] == {"name": "calculate_triangle_area", "arguments": {"base": 10, "height": 5, "unit": "units"}}
    assert simple["tools"][0]["parameters"]["type"] == "object"  # BFCL "dict"
    assert convert["tools"][0]["name"] == "temperature_convert"  # dots are not harmony recipients
    assert convert["tools"][0]["parameters"]["properties"]["value"]["type"] == "number"  # BFCL "float"
    assert convert["metadata"]["ground_truth"] == [{"temperature_convert": {"value": [98.6], "from_scale": ["fahrenheit"], "to_scale": ["celsius"]}}]
    assert [x["function"]["arguments"]["city"] for x in parallel["messages"][-1]["tool_calls"]] == ["Paris", "Tokyo"]
    assert irrelevant["metadata"]["ground_truth"] == [] and "tool_calls" not in irrelevant["messages"][-1]
    _valid(rows)


@pytest.mark.parametrize("fmt,text,reason", [
    ("medmcqa", '{"question": "q", "opa": "a", "opb": "b", "opc": "c", "opd": "d", "cop": 7}\n', ":1: cop: expected 1..4"),
    ("medmcqa", '{"question": "q", "opa": "a"}\n', ":1: missing field 'opb'"),
    ("gsm8k", '{"question": "q", "answer": "no marker"}\n{"question": "q"}\n', ":1: answer: no '#### <number>'"),
    ("pubmedqa", '{"question": "q", "context": "c", "final_decision": "perhaps"}\n', ":1: final_decision"),
    ("bfcl", 'not json\n', ":1: bad JSON"),
])
def test_loader_errors_name_file_and_line(tmp_path, fmt, text, reason):
    from ossforge.errors import UserError
    from ossforge.finetune.domains.loaders import LOADERS

    bad = tmp_path / "bad.jsonl"
    bad.write_text(text)
    with pytest.raises(UserError) as exc:
        LOADERS[fmt](bad)
    assert str(exc.value).startswith(str(bad)) and reason in str(exc.value)


def test_convert_cli(tmp_path, capsys):
    from ossforge.finetune.domains.__main__ import main

    out = tmp_path / "bfcl.jsonl"
    assert main(["convert", "bfcl", str(FX / "BFCL_v3_simple.json"), "--answers",
                 str(FX / "possible_answer" / "BFCL_v3_simple.json"), "--out", str(out), "--limit", "2"]) == 0
    assert len(out.read_text().splitlines()) == 2
    assert main(["convert", "gsm8k", str(tmp_path / "missing.jsonl"), "--out", str(tmp_path / "x.jsonl")]) == 2
    assert "missing.jsonl: file not found" in capsys.readouterr().err and not (tmp_path / "x.jsonl").exists()


@pytest.mark.parametrize("domain", ["medicine", "education"])
def test_gpu_training_sets_equal_regeneration(domain, tmp_path):
    """data/DOMAIN/train-4k.jsonl (the GPU configs' training set) is `--train 4000` of the generator."""
    from ossforge.finetune.domains.__main__ import main

    assert main([domain, "--out", str(tmp_path), "--train", "4000"]) == 0
    assert (tmp_path / "train.jsonl").read_bytes() == (REPO / "data" / domain / "train-4k.jsonl").read_bytes()
    assert (tmp_path / "heldout.jsonl").read_bytes() == (REPO / "data" / domain / "heldout.jsonl").read_bytes()
