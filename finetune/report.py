"""Run report: PNG figures and one ``report.html`` in the run folder, from what the run wrote.

    from ossforge.finetune.report import write_report
    write_report("runs/quickstart")   # -> runs/quickstart/report.html (+ loss.png, expert_load.png)

Reads ``metrics.jsonl`` (``step``, ``loss``, ``lr``, ``eval_loss``, ``expert_load``: per layer, each
expert's share of the routed token slots) and ``eval.json`` when ``ossforge eval`` has run. Draws:

- ``loss.png`` (the run folder's loss curve, also via ``RunDir.plot_loss``): training loss (and
  eval loss) per step, learning rate on a second axis;
- ``expert_load.png``: heatmap of expert load per layer over the run, and per layer the busiest
  expert's load relative to a perfectly balanced router (1.0) at each logged step (lines for a
  few layers, a layers x steps heatmap at 24 or 36 layers; at most 16 labelled ticks per axis);
- ``eval.png`` (written by ``ossforge eval``): accuracy and tokens per reasoning effort.

The trainer calls ``write_report`` at the end of a run. Every file is written atomically; missing
or unreadable inputs just leave their section out.
"""

from __future__ import annotations

import html
import io
import json
from pathlib import Path
from typing import Optional

from ossforge import atomic
from ossforge.finetune.run_dir import RunDir


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: str | Path) -> Path:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    _pyplot().close(fig)
    return atomic.write_bytes(path, buf.getvalue())


def plot_loss(records: list[dict], path: str | Path, title: str = "loss") -> Optional[Path]:
    """Training (and eval) loss per step, learning rate on a second axis; None without losses."""
    train = [(r["step"], r["loss"]) for r in records if "loss" in r]
    if not train:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(*zip(*train), label="train loss")
    evals = [(r["step"], r["eval_loss"]) for r in records if r.get("eval_loss") is not None]
    if evals:
        ax.plot(*zip(*evals), "o-", label="eval loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    lrs = [(r["step"], r["lr"]) for r in records if "lr" in r]
    if lrs:
        ax2 = ax.twinx()
        ax2.plot(*zip(*lrs), color="gray", alpha=0.5, linestyle=":", label="lr")
        ax2.set_ylabel("learning rate")
    ax.legend(loc="upper right")
    ax.set_title(title)
    fig.tight_layout()
    return save_figure(fig, path)


def expert_load(records: list[dict]) -> tuple[list[int], list[list[float]]]:
    """(steps, per-record loads) of records carrying ``expert_load`` as [layers][experts] shares."""
    steps, loads = [], []
    for r in records:
        load = r.get("expert_load")
        if isinstance(load, list) and load and all(isinstance(layer, list) and layer for layer in load):
            steps.append(r["step"])
            loads.append(load)
    return steps, loads


MAX_TICKS = 16  # labelled ticks per axis: 128 experts or 36 layers stay readable
MAX_LINES = 8  # layers drawn as lines (with a legend); more become a layers x steps heatmap


def expert_load_figure(records: list[dict]):
    """The ``expert_load.png`` figure, or None without (consistent) expert-load records.

    Left: share of routed tokens per layer and expert (mean over the run). Right: per layer, the
    busiest expert's load relative to a balanced router (1.0) at each logged step: one line per layer
    up to ``MAX_LINES`` layers, a layers x steps heatmap beyond (36 lines have no readable legend).
    """
    import numpy as np
    from matplotlib.ticker import MaxNLocator

    steps, loads = expert_load(records)
    if not loads or len({(len(x), len(x[0])) for x in loads}) != 1:
        return None
    arr = np.asarray(loads, dtype=float)  # [records, layers, experts]
    _, layers, experts = arr.shape
    mean = arr.mean(axis=0)
    busiest = arr.max(axis=2) * experts  # [records, layers]
    plt = _pyplot()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 3.5 + 0.08 * layers))
    im = ax1.imshow(mean * experts, aspect="auto", cmap="viridis", vmin=0, interpolation="nearest")
    ax1.xaxis.set_major_locator(MaxNLocator(MAX_TICKS // 2, integer=True))  # 3-digit labels need room
    ax1.yaxis.set_major_locator(MaxNLocator(MAX_TICKS, integer=True))
    ax1.set_xlabel(f"expert (of {experts})")
    ax1.set_ylabel(f"layer (of {layers})")
    ax1.set_title("expert load / balanced (mean over run)")
    fig.colorbar(im, ax=ax1, label="1.0 = balanced")
    ax2.set_title("busiest expert / balanced load")
    if layers <= MAX_LINES:
        for layer in range(layers):
            ax2.plot(steps, busiest[:, layer], label=f"layer {layer}")
        ax2.axhline(1.0, color="gray", linestyle=":")
        ax2.set_xlabel("step")
        ax2.legend(fontsize=7)
    else:
        im2 = ax2.imshow(busiest.T, aspect="auto", cmap="magma", vmin=1.0, interpolation="nearest",
                         extent=(steps[0] - 0.5, steps[-1] + 0.5, layers - 0.5, -0.5))
        ax2.yaxis.set_major_locator(MaxNLocator(MAX_TICKS, integer=True))
        ax2.xaxis.set_major_locator(MaxNLocator(MAX_TICKS, integer=True))
        ax2.set_xlabel("step")
        ax2.set_ylabel("layer")
        fig.colorbar(im2, ax=ax2, label="busiest / balanced")
    fig.tight_layout()
    return fig


def plot_expert_load(records: list[dict], path: Path) -> Optional[Path]:
    fig = expert_load_figure(records)
    return None if fig is None else save_figure(fig, path)


def _eval_section(report: dict) -> str:
    rows = []
    models = [m for m in ("base", "tuned") if m in report]
    keys = ("tool_call_accuracy", "call_accuracy", "no_call_accuracy", "well_formed_calls", "accuracy",
            "eval_loss", "output_tokens", "reasoning_tokens")
    for k in keys:
        vals = [report[m].get(k) for m in models]
        if all(v is None for v in vals):
            continue
        cells = "".join(f"<td>{'-' if v is None else (f'{100 * v:.1f}%' if 'acc' in k or 'formed' in k else f'{v:.4g}')}</td>"
                        for v in vals)
        rows.append(f"<tr><td>{k}</td>{cells}</tr>")
    head = "".join(f"<th>{m}</th>" for m in models)
    return (f"<h2>Evaluation</h2><p>{html.escape(report.get('data', ''))}: {report.get('cases')} cases, "
            f"efforts {html.escape(str(report.get('efforts')))}</p>"
            f"<table><tr><th>metric</th>{head}</tr>{''.join(rows)}</table>")


def write_report(run_dir: str | Path) -> Path:
    """Write the figures and ``report.html`` of a run folder; returns the HTML path."""
    files = RunDir(run_dir)
    run = files.path
    records = files.read_metrics()
    parts = [f"<h1>ossforge run: {html.escape(str(run))}</h1>"]
    losses = [r["loss"] for r in records if "loss" in r]
    if losses:
        drop = 100 * (losses[0] - losses[-1]) / losses[0] if losses[0] else 0.0
        parts.append(f"<p>{len(records)} logged steps; loss {losses[0]:.4f} -> {losses[-1]:.4f} ({drop:.0f}% lower)</p>")
    if plot_loss(records, files.loss_png, title=run.name):
        parts.append(f'<h2>Loss</h2><img src="{files.loss_png.name}" alt="loss curves">')
    if plot_expert_load(records, files.expert_load_png):
        parts.append(f'<h2>Expert load</h2><img src="{files.expert_load_png.name}" alt="expert load per layer">')
    eval_json = run / "eval.json"
    if eval_json.is_file():
        try:
            parts.append(_eval_section(json.loads(eval_json.read_text())))
        except (ValueError, KeyError, TypeError, AttributeError):
            pass  # a hand-edited or foreign eval.json: leave the section out
        if (run / "eval.png").is_file():
            parts.append('<img src="eval.png" alt="eval by reasoning effort">')
    style = "body{font-family:sans-serif;max-width:1000px;margin:2em auto}td,th{padding:2px 10px;text-align:right}"
    page = f"<!doctype html><html><head><meta charset='utf-8'><title>ossforge run</title><style>{style}</style></head><body>{''.join(parts)}</body></html>\n"
    return atomic.write_text(files.report_html, page)
