"""The run report stays readable at gpt-oss-120b scale: 36 layers x 128 experts."""

from __future__ import annotations

import json

import numpy as np

from ossforge.finetune.report import MAX_TICKS, expert_load_figure, write_report


def _records(layers: int, experts: int, steps: int, hot: tuple[int, int]) -> list[dict]:
    rng = np.random.default_rng(0)
    out = []
    for step in range(1, steps + 1):
        load = rng.dirichlet(np.full(experts, 20.0), size=layers)
        load[hot[0], hot[1]] += 0.5  # one overloaded expert, visible in both panels
        load /= load.sum(axis=1, keepdims=True)
        out.append({"step": step, "loss": 3.0 - 0.01 * step, "lr": 1e-4, "expert_load": load.round(5).tolist()})
    return out


def _labelled(ticks, limit) -> list[float]:
    lo, hi = sorted(limit)
    return [t for t in ticks if lo <= t <= hi]


def test_120b_expert_load_is_a_heatmap_with_few_ticks(tmp_path):
    records = _records(36, 128, 20, hot=(7, 100))
    fig = expert_load_figure(records)
    heat, over_steps, colorbar, colorbar2 = fig.axes
    image = heat.get_images()[0].get_array()
    assert image.shape == (36, 128)
    assert np.unravel_index(np.argmax(image), image.shape) == (7, 100)  # the hot expert is the brightest cell
    assert len(_labelled(heat.get_xticks(), heat.get_xlim())) <= MAX_TICKS + 1  # not 128 labels
    assert len(_labelled(heat.get_yticks(), heat.get_ylim())) <= MAX_TICKS + 1
    # 36 layers: a layers x steps heatmap with a colour scale instead of 36 lines and a legend
    assert not over_steps.get_lines() and over_steps.get_legend() is None
    busiest = over_steps.get_images()[0].get_array()
    assert busiest.shape == (36, 20) and busiest[7].min() > busiest[np.arange(36) != 7].max()
    assert colorbar.get_ylabel() and colorbar2.get_ylabel() == "busiest / balanced"

    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    write_report(run)
    assert (run / "expert_load.png").read_bytes()[:4] == b"\x89PNG"
    assert 'src="expert_load.png"' in (run / "report.html").read_text()


def test_few_layers_keep_lines_with_a_legend():
    fig = expert_load_figure(_records(2, 8, 5, hot=(1, 3)))
    _, over_steps, _ = fig.axes
    assert len(over_steps.get_lines()) == 3 and over_steps.get_legend() is not None  # 2 layers + balanced line
