"""What ``ossforge COMMAND --help`` says: plain words for users, kept apart from the modules'
docstrings (which are written for people reading the code)."""

from __future__ import annotations

import argparse

DESCRIPTIONS = {
    "train": """\
Fine-tune a gpt-oss model with LoRA, as a YAML config describes.

The config is checked first: a mistake stops the run before any model is built or any file is
written. Progress shows as a bar; metrics, checkpoints and the adapter go to the config's
output_dir. Press Ctrl-C once to stop after the current step and save; --resume continues there.

examples:
  ossforge train configs/quickstart.yaml                       # tiny model on the CPU, a few minutes
  ossforge train configs/quickstart.yaml --set training.max_steps=20 --set lora.r=16
  ossforge train configs/medicine-20b.yaml --set model.path=/models/gpt-oss-20b
  ossforge train configs/medicine-120b-8xh100.yaml --nproc 8   # one process per GPU
  ossforge train configs/quickstart.yaml --resume              # continue a stopped run""",
    "data": """\
Check a dataset, or write out the exact tokens and labels training will use.

Datasets are JSONL files, parquet files or folders saved with the datasets library, one
conversation per row (see the README, "Data").

examples:
  ossforge data check data/medicine/train.jsonl          # every bad row as FILE:LINE: reason
  ossforge data render data/medicine/train.jsonl --out tokens.jsonl
  ossforge data render data/medicine/train.jsonl --out tokens.jsonl --config configs/medicine-tiny.yaml""",
    "plan": """\
Estimate the memory each GPU needs for a config and how the experts are spread over GPUs, before
anything is loaded. Works without the model weights (the architecture comes from the preset or the
model folder's config.json).

examples:
  ossforge plan configs/medicine-20b.yaml --gpus 1 --gpu-mem-gib 80
  ossforge plan configs/medicine-120b-8xh100.yaml --gpus 8
  ossforge plan configs/medicine-120b-2x8xh100.yaml --gpus 16 --json""",
    "eval": """\
Score the base model and the tuned adapter side by side on an eval set.

Tool-calling rows are judged call by call: rows converted from the Berkeley Function-Calling
Leaderboard (BFCL) exactly as BFCL's own checker judges them, with accuracy per BFCL category;
the project's own domain sets by stricter checks against each tool's schema. Multiple-choice and
number answers are scored too, plus the eval loss, per reasoning effort. A table goes to the
terminal, JSON to stdout, and eval.json / eval.png to the run folder.

examples:
  ossforge eval configs/quickstart.yaml                          # base vs runs/quickstart/adapter
  ossforge eval configs/quickstart.yaml --efforts all --limit 20
  ossforge eval configs/medicine-20b.yaml --data bfcl_live.jsonl --no-adapter --json > scores.json""",
    "merge": """\
Fold a LoRA adapter into its base model and write a checkpoint folder that stock transformers
(and vLLM or SGLang) load without peft.

The base is found from --base, else the adapter's recorded base folder, else the base/ folder a
training run writes beside adapter/. The logits of a short probe are compared before and after
merging. With --mxfp4 the experts are stored in the published 4-bit format, and the command reports
how much of the adapter's effect survives the rounding.

examples:
  ossforge merge --adapter runs/quickstart/adapter --out runs/quickstart/merged
  ossforge merge --adapter runs/med-20b/adapter --base /models/gpt-oss-20b --out merged-20b --mxfp4""",
    "chat": """\
Talk to a domain assistant (medicine or education) in the terminal.

Answers stream as they are written; tool calls and their results show as they happen; the model's
reasoning shows only with --show-reasoning. One message per line from the keyboard or a pipe;
type exit (or end the input) to quit. Nothing is saved unless you pass --trace FILE.

examples:
  ossforge chat --domain medicine --adapter runs/quickstart/adapter
  ossforge chat --domain education --model merged/ --show-reasoning
  ossforge chat --domain medicine --server http://localhost:8000 --server-model med
  echo "Dose of paracetamol for 18 kg?" | ossforge chat --domain medicine""",
    "bench": """\
Time ossforge against the stock transformers + peft path, in the same run.

  moe    one MoE layer with expert LoRA, forward + backward
  train  whole LoRA training steps of a reduced-depth model with the real layer shapes

examples:
  ossforge bench moe --device cpu
  ossforge bench moe --device cuda --shape 120b --json bench-120b.json""",
    "demo": """\
Show what a trained run does on a held-out prompt: the base model's and the tuned model's replies
side by side, as raw harmony tokens and as the tool call an agent would receive.

examples:
  ossforge demo runs/quickstart
  ossforge demo runs/quickstart --index 3 --score 20""",
    "mcp": """\
Offer a domain assistant's tools to other agents over the Model Context Protocol (MCP).

examples:
  ossforge mcp serve --domain medicine              # stdio, for a client that starts the server
  ossforge mcp serve --domain education --port 8765  # streamable HTTP""",
}

# Subcommands whose module text is written for developers.
SUB_DESCRIPTIONS = {
    ("bench", "moe"): """\
Time one gpt-oss MoE layer with LoRA on its experts, forward and backward, three ways in the same
run: ossforge's fused kernels, transformers' grouped matmul path with peft's LoRA, and transformers'
plain loop with peft's LoRA. All three get the same weights and inputs; the run first checks that
ossforge's outputs and gradients match, then reports the time per step, the speed-up, peak GPU memory,
achieved TFLOP/s and how close that is to a plain matrix multiply of the same size on this device.
With --expert-format mxfp4 it also times the layer with experts kept in 4-bit MXFP4.

examples:
  ossforge bench moe --device cpu
  ossforge bench moe --device cuda --shape 120b --json bench-120b.json
  ossforge bench moe --device cuda --shape 20b --expert-format mxfp4""",
    ("bench", "train"): """\
Time whole LoRA training steps (forward, backward, optimizer) of a shallow model with the real
gpt-oss layer sizes and vocabulary, the ossforge way and the way a plain transformers + peft setup
trains (grouped-matmul experts, eager attention, logits for every token), alternating in one run.
Reports tokens per second, model TFLOP/s, the share of a plain matrix multiply's speed, peak memory,
and with --gpu-mem-gib the longest sequence that still fits. The FLOP count is in the README
("Whole training steps").

examples:
  ossforge bench train --shape tiny --device cpu
  ossforge bench train --shape 20b --layers 2 --seq 4096 --gpu-mem-gib 80""",
}


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Descriptions as written, and every option's default shown unless its help already says it."""

    def _get_help_string(self, action):
        text = action.help or ""
        default = action.default
        if (default is None or default is False or default is argparse.SUPPRESS or default == []
                or "default" in text.lower() or not action.option_strings):
            return text
        return f"{text} (default: %(default)s)" if text else "(default: %(default)s)"
