"""ossforge eval: BFCL-style call checking, case extraction, scoring through the agents parser, CLI."""

from __future__ import annotations

import json

import pytest

from ossforge.finetune.domains.scoring import check_calls, choice_answer, exact_answer_ok, expected_from_calls
from tests.conftest import REPO, run_cli

DOSE = {"name": "dose_calc", "parameters": {"type": "object", "properties": {
    "mg_per_kg": {"type": "number"}, "weight_kg": {"type": "number"},
    "max_dose_mg": {"type": "number", "nullable": True}}, "required": ["mg_per_kg", "weight_kg"]}}
UNIT = {"name": "convert", "parameters": {"type": "object", "properties": {
    "value": {"type": "integer"}, "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
    "required": ["value"]}}


def _gt(**args):
    return [{"dose_calc": {k: [v] for k, v in args.items()}}]


@pytest.mark.parametrize("pred,expected,tools,ok", [
    ([{"name": "dose_calc", "args": {"mg_per_kg": 15.0, "weight_kg": 20}}], _gt(mg_per_kg=15, weight_kg=20), [DOSE], True),
    ([{"name": "dose_calc", "args": {"mg_per_kg": 15, "weight_kg": 21}}], _gt(mg_per_kg=15, weight_kg=20), [DOSE], False),
    ([{"name": "dose_calk", "args": {"mg_per_kg": 15, "weight_kg": 20}}], _gt(mg_per_kg=15, weight_kg=20), [DOSE], False),
    ([{"name": "dose_calc", "args": {"mg_per_kg": 15}}], _gt(mg_per_kg=15, weight_kg=20), [DOSE], False),  # missing required
    ([{"name": "dose_calc", "args": {"mg_per_kg": 15, "weight_kg": 20, "max_dose_mg": 5}}],
     _gt(mg_per_kg=15, weight_kg=20), [DOSE], False),  # extra argument
    ([{"name": "dose_calc", "args": {"mg_per_kg": "15", "weight_kg": 20}}], _gt(mg_per_kg=15, weight_kg=20), [DOSE], False),  # type
    ([{"name": "dose_calc", "args": {"mg_per_kg": True, "weight_kg": 20}}], _gt(mg_per_kg=1, weight_kg=20), [DOSE], False),  # bool is no number
    ([{"name": "convert", "args": {"value": 3.5}}], [{"convert": {"value": [3.5]}}], [UNIT], False),  # float for integer
    ([{"name": "convert", "args": {"value": 3, "unit": "kelvin"}}], [{"convert": {"value": [3], "unit": ["kelvin"]}}], [UNIT], False),  # enum
    ([{"name": "convert", "args": {"value": 3}}], [{"convert": {"value": [3], "unit": ["celsius", ""]}}], [UNIT], True),  # "" = optional
    ([{"name": "convert", "args": {"value": 3, "unit": "Celsius"}}], [{"convert": {"value": [3], "unit": ["celsius", ""]}}], [UNIT], True),
    ([], [], [DOSE], True),  # no call expected, none made
    ([{"name": "dose_calc", "args": {"mg_per_kg": 1, "weight_kg": 2}}], [], [DOSE], False),
])
def test_check_calls(pred, expected, tools, ok):
    assert (check_calls(pred, expected, tools) is None) is ok


def test_parallel_calls_match_in_any_order():
    expected = _gt(mg_per_kg=15, weight_kg=20) + _gt(mg_per_kg=10, weight_kg=20)
    a = {"name": "dose_calc", "args": {"mg_per_kg": 10, "weight_kg": 20}}
    b = {"name": "dose_calc", "args": {"mg_per_kg": 15, "weight_kg": 20}}
    assert check_calls([a, b], expected, [DOSE]) is None
    assert check_calls([b, a], expected, [DOSE]) is None
    assert check_calls([a, a], expected, [DOSE]) is not None
    assert check_calls([a], expected, [DOSE]) == "1 calls instead of 2"


def test_answer_extraction():
    assert choice_answer("Answer: C", list("ABCD")) == "C"
    assert choice_answer("It is (b) because...", list("ABCD")) is None  # lower-case single letter is prose
    assert choice_answer("The answer is B.", list("ABCD")) == "B"
    assert choice_answer("Maybe, the data are mixed.", ["yes", "no", "maybe"]) == "maybe"
    assert exact_answer_ok("so 1,200 in total", "1200") and not exact_answer_ok("about 12", "1200")
    assert expected_from_calls([{"function": {"name": "f", "arguments": '{"x": 1}'}}]) == [{"f": {"x": [1]}}]


def _rows(path):
    return [json.loads(line) for line in open(path)]


def test_row_cases_from_shipped_and_public_rows():
    from ossforge.finetune.domains.loaders import load_bfcl, load_medmcqa
    from ossforge.finetune.evaluate import row_cases

    rows = _rows(REPO / "data/medicine/heldout.jsonl")
    multi = next(r for r in rows if sum(m["role"] == "user" for m in r["messages"]) == 2)
    cases = row_cases(multi, "x:1", None)
    assert len(cases) == 2 and all(c.kind == "tool_call" and len(c.expected) == 1 for c in cases)
    assert cases[1].messages[-1]["role"] == "user" and cases[1].effort == multi["reasoning_effort"]
    nocall = next(r for r in rows if not any(m.get("tool_calls") for m in r["messages"]))
    assert row_cases(nocall, "x:2", ["low", "high"])[1].expected == [] and len(row_cases(nocall, "x:2", ["low", "high"])) == 2

    fx = REPO / "tests/fixtures/public"
    bfcl = load_bfcl(fx / "BFCL_v3_simple.json", fx / "possible_answer/BFCL_v3_simple.json")
    case = row_cases(bfcl[0], "b:1", None)[0]
    assert case.expected == [{"calculate_triangle_area": {"base": [10], "height": [5], "unit": ["units", ""]}}]
    mc = row_cases(load_medmcqa(fx / "medmcqa_dev.json")[0], "m:1", None)[0]
    assert (mc.kind, mc.answer) == ("choice", "C")


CALL = ('<|channel|>analysis<|message|>Rule given.<|end|><|start|>assistant to=functions.dose_calc<|channel|>commentary '
        '<|constrain|>json<|message|>{ARGS}<|call|>')


def _case(expected):
    from ossforge.finetune.evaluate import Case

    return Case("t:1", [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}], [DOSE], "low",
                "tool_call", expected=expected)


def test_replies_are_scored_as_the_agents_parser_reads_them():
    """Scripted model output -> agents' parse_completion -> AST check (no model needed)."""
    from ossforge.agents.backends import ScriptedBackend
    from ossforge.finetune.evaluate import generate_reply, score

    good = CALL.replace("{ARGS}", '{"mg_per_kg": 15, "weight_kg": 20}')
    reply = generate_reply(ScriptedBackend([good, "functions"]), _case(_gt(mg_per_kg=15, weight_kg=20)), 100)
    assert reply.calls == [{"name": "dose_calc", "args": {"mg_per_kg": 15, "weight_kg": 20}}]
    assert reply.reasoning_tokens > 0 and score(_case(_gt(mg_per_kg=15, weight_kg=20)), reply)["ok"]

    bad_json = CALL.replace("{ARGS}", '{"mg_per_kg": 15, "weight_kg": ')
    reply = generate_reply(ScriptedBackend([bad_json, "functions"]), _case(_gt(mg_per_kg=15, weight_kg=20)), 100)
    s = score(_case(_gt(mg_per_kg=15, weight_kg=20)), reply)
    assert not s["ok"] and not s["well_formed"] and "invalid" in s["why"]

    # parallel: after <|call|> the model continues with another assistant call, then expects results
    second = CALL.replace("{ARGS}", '{"mg_per_kg": 10, "weight_kg": 20}').split("<|start|>assistant", 1)[1]
    backend = ScriptedBackend([good, "assistant", second, "functions"])
    expected = _gt(mg_per_kg=10, weight_kg=20) + _gt(mg_per_kg=15, weight_kg=20)
    reply = generate_reply(backend, _case(expected), 200)
    assert len(reply.calls) == 2 and score(_case(expected), reply)["ok"]

    final = "<|channel|>analysis<|message|>No weight.<|end|><|start|>assistant<|channel|>final<|message|>15 mg/kg.<|return|>"
    reply = generate_reply(ScriptedBackend([final]), _case([]), 100)
    assert score(_case([]), reply)["ok"] and not score(_case(_gt(mg_per_kg=1, weight_kg=2)), reply)["ok"]


def _tiny_config(tmp_path, rows=2):
    data = tmp_path / "heldout.jsonl"
    data.write_text("".join(line for line in open(REPO / "data/medicine/heldout.jsonl").readlines()[:rows]))
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"model: {{preset: tiny}}\ndata: {{train: {data}, eval: {data}}}\n"
                   f"training: {{seq_len: 512, micro_batch_size: 2}}\noutput_dir: {tmp_path / 'run'}\n")
    return cfg


def test_eval_cli_base_model(tmp_path):
    """The whole command on a random tiny base: JSON on stdout, files written, nothing right."""
    cfg = _tiny_config(tmp_path)
    proc = run_cli("eval", str(cfg), "--max-new-tokens", "6", "--json", "--efforts", "low,high",
                   env={"OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    base = report["base"]
    assert "tuned" not in report and report["cases"] == base["cases"] >= 4
    assert set(base["by_effort"]) == {"low", "high"}
    assert base["tool_call_accuracy"] == 0.0 and base["output_tokens"] == 6.0
    assert base["eval_loss"] > 5  # random init: near log(vocab)
    assert (tmp_path / "run/eval.png").stat().st_size > 1000 and (tmp_path / "run/eval.json").is_file()


@pytest.mark.parametrize("args,message", [
    (["--efforts", "extreme"], "--efforts"),
    (["--adapter", "nowhere"], "nowhere: --adapter"),
    (["--limit", "0"], "--limit"),
    (["--max-new-tokens", "0"], "--max-new-tokens"),
])
def test_eval_cli_user_errors(tmp_path, capsys, args, message):
    """Flag mistakes: exit 2 and one error line, before any model is built (in-process: fast)."""
    from ossforge.cli import main

    assert main(["eval", str(_tiny_config(tmp_path)), *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and not (tmp_path / "run").exists()


def test_eval_cli_needs_an_eval_set(tmp_path, capsys):
    from ossforge.cli import main

    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"model: {{preset: tiny}}\ndata: {{train: {REPO / 'data/medicine/heldout.jsonl'}}}\n")
    assert main(["eval", str(cfg)]) == 2
    assert "data.eval" in capsys.readouterr().err


def test_write_report(tmp_path):
    """Figures and HTML from metrics.jsonl + eval.json; sections without inputs are left out."""
    from ossforge.finetune.report import write_report

    run = tmp_path / "run"
    run.mkdir()
    html = write_report(run)  # empty run: a page, no figures
    assert "<img" not in html.read_text()
    lines = [{"step": s, "loss": 12 - s, "lr": 1e-3, "tokens_per_s": 100.0,
              "expert_load": [[0.5, 0.25, 0.25, 0.0], [0.25, 0.25, 0.25, 0.25]]} for s in range(1, 5)]
    lines[-1]["eval_loss"] = 7.5
    lines.append({"step": 4, "loss": 8.0, "lr": 1e-3, "tokens_per_s": 1.0, "expert_load": []})  # no load: skipped
    (run / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines) + '{"step": 5, "lo')
    (run / "eval.json").write_text(json.dumps({"data": "h.jsonl", "cases": 3, "efforts": "row",
                                               "base": {"tool_call_accuracy": 0.0}, "tuned": {"tool_call_accuracy": 0.5}}))
    text = write_report(run).read_text()
    assert "loss.png" in text and "expert_load.png" in text and "50.0%" in text and "(27% lower)" in text
    assert (run / "expert_load.png").stat().st_size > 1000


# ----------------------------------------------------------------------------- BFCL-exact scoring

HOTEL = {"name": "hotel.book", "parameters": {"type": "dict", "required": ["city", "guests"], "properties": {
    "city": {"type": "string", "enum": ["Paris", "Rome"]},
    "guests": {"type": "dict", "properties": {"adults": {"type": "integer"}, "children": {"type": "integer"}}},
    "nights": {"type": "float"},
    "rooms": {"type": "array", "items": {"type": "integer"}},
    "budget": {"type": "integer"}}}}
HOTEL_GT = [{"hotel_book": {"city": ["Berlin"], "guests": [{"adults": [2], "children": [0, ""]}],
                            "nights": [3.0], "rooms": ["data['rooms']", ""], "budget": [None, ""]}}]


@pytest.mark.parametrize("args,ok", [
    ({"city": "berlin", "guests": {"adults": 2}, "nights": 3}, True),  # enum not checked, int -> float, optional key
    ({"city": "Berlin", "guests": {"adults": [2]}, "nights": 3.0}, False),  # the answer's list is not the value
    ({"city": "Berlin", "guests": {"adults": 2, "children": 0}, "nights": 3.0, "budget": None}, True),  # None allowed
    ({"city": "Berlin", "guests": {"adults": 2}, "nights": 3.0, "rooms": "data['rooms']"}, True),  # variable rule
    ({"city": "Berlin", "guests": {"adults": 2}, "nights": 3.0, "rooms": [1, 2]}, False),
    ({"city": "Berlin", "guests": {"adults": 2}, "nights": 3.0, "budget": 100}, False),
    ({"city": "Berlin", "guests": {"adults": True}, "nights": 3.0}, False),  # bool is no integer answer
    ({"city": "Berlin", "nights": 3.0}, False),  # required
])
def test_bfcl_scoring_rules(args, ok):
    from ossforge.finetune.domains.bfcl_checker import check_calls_bfcl

    assert (check_calls_bfcl([{"name": "hotel_book", "args": args}], HOTEL_GT, [HOTEL], "simple_python") is None) is ok


def test_bfcl_rows_are_scored_bfcl_style_unless_asked(tmp_path):
    """``score`` picks BFCL's rules for BFCL-sourced cases; ``schema`` keeps the strict enum check."""
    from ossforge.finetune.evaluate import Case, Reply, score

    case = Case("b:1", [{"role": "user", "content": "u"}], [], "low", "tool_call", expected=HOTEL_GT,
                category="simple_python", functions=[HOTEL])
    reply = Reply([{"name": "hotel_book", "args": {"city": "Berlin", "guests": {"adults": 2}, "nights": 3}}], [], "", 1, 0)
    assert score(case, reply)["ok"] and score(case, reply, "bfcl")["ok"]
    assert not score(case, reply, "schema")["ok"]  # Berlin is outside the schema's enum


def test_eval_cli_reports_bfcl_categories(tmp_path):
    """``ossforge eval --data`` on converted BFCL rows: per-category accuracy and the leaderboard columns."""
    from ossforge.finetune.domains.common import write_jsonl
    from ossforge.finetune.domains.loaders import load_bfcl
    from tests import bfcl_upstream as up

    data = up.extract_data(tmp_path / "bfcl")
    rows = []
    for category in ("simple_python", "live_parallel", "live_irrelevance"):
        rows += load_bfcl(*up.category_files(data, category), limit=2)
    converted = tmp_path / "bfcl.jsonl"
    write_jsonl(converted, rows)
    cfg = _tiny_config(tmp_path)
    proc = run_cli("eval", str(cfg), "--data", str(converted), "--max-new-tokens", "4", env={"OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)["base"]["bfcl"]
    assert set(report["categories"]) == {"simple_python", "live_parallel", "live_irrelevance"}
    assert all(c["cases"] == 2 for c in report["categories"].values())
    assert set(report["groups"]) == {"non_live", "live", "irrelevance"}
    assert "simple_python (2)" in proc.stderr and "non-live" in proc.stderr and "random-init preset" in proc.stderr
    table = proc.stderr.splitlines()
    assert table.index(next(x for x in table if x.startswith("well_formed_calls"))) < \
        table.index(next(x for x in table if x.startswith("tool_call_accuracy")))
