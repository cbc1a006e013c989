"""An ossforge adapter as vLLM's gpt-oss LoRA loader expects it (names, shapes, adapter_config.json).

Offline: the expectations are read from vLLM's source (see ``ossforge.agents.serving`` for the files
and commits) and checked against adapters made by ossforge's own LoRA code, at toy and real shapes.
"""

from __future__ import annotations

import json

import pytest

from ossforge.agents.serving import vllm_adapter_problems
from ossforge.finetune.config import LoraConfig
from ossforge.finetune.lora import apply_lora


def _adapter(tmp_path, tiny_model, **lora):
    model = apply_lora(tiny_model, LoraConfig(r=2, alpha=4, **lora))
    model.save_pretrained(tmp_path / "adapter")
    return tmp_path / "adapter", tiny_model.config


def test_default_ossforge_adapter_matches_vllm(tmp_path, tiny_model):
    adapter, config = _adapter(tmp_path, tiny_model)
    assert vllm_adapter_problems(adapter, config) == []
    from safetensors import safe_open

    with safe_open(str(adapter / "adapter_model.safetensors"), "pt") as f:
        keys = set(f.keys())
    # vLLM's FusedMoE3DWithLoRA: w13 (gate_up) under experts.base_layer, w2 (down) under experts
    assert "base_model.model.model.layers.1.mlp.experts.base_layer.lora_B.weight" in keys
    assert "base_model.model.model.layers.1.mlp.experts.lora_A.weight" in keys
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and not cfg["use_dora"] and cfg["bias"] == "none"


def test_expert_layers_subset_still_matches(tmp_path, tiny_model):
    adapter, config = _adapter(tmp_path, tiny_model, expert_layers=[1])
    assert vllm_adapter_problems(adapter, config) == []


def test_gate_up_only_would_be_misread_as_down_proj(tmp_path, tiny_model):
    adapter, config = _adapter(tmp_path, tiny_model, expert_targets=["gate_up_proj"])
    problems = vllm_adapter_problems(adapter, config)
    assert any("vLLM reads it as down_proj (w2)" in p for p in problems)
    assert any("must cover both gate_up_proj and down_proj" in p for p in problems)


def test_unsupported_targets_are_named(tmp_path, tiny_model):
    adapter, config = _adapter(tmp_path, tiny_model)
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    cfg.update(target_modules=["q_proj", "router"], use_dora=True)
    (adapter / "adapter_config.json").write_text(json.dumps(cfg))
    problems = vllm_adapter_problems(adapter, config)
    assert any("'router' is not LoRA-capable" in p for p in problems) and any("use_dora" in p for p in problems)


def test_wrong_base_shape_is_caught(tmp_path, tiny_model):
    adapter, config = _adapter(tmp_path, tiny_model)
    other = config.__class__(**{**config.to_dict(), "num_local_experts": config.num_local_experts * 2})
    assert any("has shape" in p for p in vllm_adapter_problems(adapter, other))


@pytest.mark.parametrize("preset", ["gpt-oss-20b", "gpt-oss-120b"])
def test_real_shapes_on_the_meta_device(preset):
    """The same check at the published shapes (r=16): peft's own names and shapes for a one-layer
    model of the real width, built on the meta device (no memory)."""
    import torch
    from peft import get_peft_model_state_dict
    from transformers import GptOssForCausalLM

    from ossforge.agents.serving import vllm_layout_problems
    from ossforge.model.presets import make_config

    config = make_config(preset, num_hidden_layers=1, layer_types=["sliding_attention"])
    with torch.device("meta"):
        model = GptOssForCausalLM(config)
    peft_model = apply_lora(model, LoraConfig(r=16, alpha=32))
    shapes = {k: tuple(v.shape) for k, v in get_peft_model_state_dict(peft_model).items()}
    cfg = peft_model.peft_config["default"].to_dict()
    assert vllm_layout_problems(cfg, shapes, config) == []
    E = 32 if preset == "gpt-oss-20b" else 128
    assert shapes["base_model.model.model.layers.0.mlp.experts.base_layer.lora_B.weight"] == (2 * 2880, 16 * E)
    assert shapes["base_model.model.model.layers.0.mlp.experts.lora_A.weight"] == (16 * E, 2880)


# ---------------------------------------------------------------- ossforge eval --server

def _served(models: dict[str, str]):
    """A /v1/completions server that answers by the requested model name (like vLLM serving the
    base plus --lora-modules med=...)."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    seen: list[str] = []

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *a):
            pass

        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            seen.append(body["model"])
            if body["model"] not in models:
                self.send_response(404)
                self.end_headers()
                self.wfile.write(json.dumps({"object": "error", "message": f"model {body['model']} not found"}).encode())
                return
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.end_headers()
            choice = {"text": models[body["model"]], "finish_reason": "stop"}
            self.wfile.write(f"data: {json.dumps({'choices': [choice]})}\n\ndata: [DONE]\n\n".encode())

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    return httpd, f"http://127.0.0.1:{httpd.server_address[1]}/v1", seen


def test_eval_scores_base_and_adapter_through_a_server(tmp_path):
    from tests.conftest import REPO, run_cli

    data = tmp_path / "heldout.jsonl"
    data.write_text(open(REPO / "data/medicine/heldout.jsonl").readline())
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"model: {{preset: gpt-oss-120b}}\ndata: {{train: {data}, eval: {data}}}\n"
                   f"output_dir: {tmp_path / 'run'}\n")
    call = ('<|channel|>analysis<|message|>Use dose_calc.<|end|><|start|>assistant to=functions.dose_calc'
            '<|channel|>commentary <|constrain|>json<|message|>{"mg_per_kg": 2, "weight_kg": 84, "max_dose_mg": 100}'
            '<|call|>')
    httpd, url, seen = _served({"med": call, "gpt-oss-120b": "<|channel|>final<|message|>No idea.<|return|>"})
    try:
        proc = run_cli("eval", str(cfg), "--server", url, "--server-model", "med", "--server-base-model",
                       "gpt-oss-120b", "--json", "--max-new-tokens", "64")
        assert proc.returncode == 0, proc.stderr
        report = json.loads(proc.stdout)
        assert report["server"] == url and report["tuned_model"] == "med"
        assert report["tuned"]["tool_call_accuracy"] > report["base"]["tool_call_accuracy"]
        assert report["tuned"]["eval_loss"] is None and {"med", "gpt-oss-120b"} <= set(seen)
        assert (tmp_path / "run" / "eval.json").is_file()
        # a name the server does not have: one line, exit 2
        proc = run_cli("eval", str(cfg), "--server", url, "--server-model", "nope", "--json")
        assert proc.returncode == 2 and "HTTP 404" in proc.stderr and "model nope not found" in proc.stderr
        assert "Traceback" not in proc.stderr
    finally:
        httpd.shutdown()
        httpd.server_close()
