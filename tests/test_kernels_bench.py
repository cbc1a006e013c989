"""`ossforge bench moe` end to end on a tiny layer: runs all three variants and writes valid JSON."""

from __future__ import annotations

import json

from tests.conftest import run_cli


def test_bench_moe_tiny_writes_json(tmp_path):
    out = tmp_path / "moe.json"
    proc = run_cli("bench", "moe", "--shape", "tiny", "--iters", "2", "--warmup", "1", "--json", str(out),
                   env={"OSSFORGE_MOE_BACKEND": "torch"})
    assert proc.returncode == 0, proc.stderr
    result = json.loads(out.read_text())
    assert set(result["results"]) == {"ossforge", "grouped_mm", "eager"}
    assert result["experts"] == 8 and result["dtype"] == "float32"
    assert result["max_rel_diff"] < 1e-5  # ossforge output and gradients equal grouped_mm + peft
    for name in ("grouped_mm", "eager"):
        assert result["results"][name]["ossforge_speedup"] > 0
    assert result["dense_matmul"]["tflops"] > 0
    assert "ossforge" in proc.stdout and "grouped_mm" in proc.stdout


def test_bench_cuda_without_gpu_is_user_error():
    import torch

    if torch.cuda.is_available():
        return
    proc = run_cli("bench", "moe", "--device", "cuda", "--shape", "tiny")
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: --device:")


def test_bench_json_has_grouped_gemm_throughput(tmp_path):
    out = tmp_path / "g.json"
    proc = run_cli("bench", "moe", "--shape", "tiny", "--tokens", "32", "--iters", "1", "--warmup", "0",
                   "--skip", "eager", "--json", str(out))
    assert proc.returncode == 0, proc.stderr
    result = json.loads(out.read_text())
    assert result["backend"] == "torch" and set(result["results"]) == {"ossforge", "grouped_mm"}
    assert result["grouped_gemm"]["ms"] > 0 and result["grouped_gemm"]["pct_dense"] > 0


def test_bench_moe_mxfp4_times_the_packed_layer_beside_bf16(tmp_path):
    out = tmp_path / "mx.json"
    proc = run_cli("bench", "moe", "--shape", "tiny-mxfp4", "--expert-format", "mxfp4", "--iters", "1", "--warmup",
                   "0", "--skip", "eager", "--json", str(out), env={"OSSFORGE_MOE_BACKEND": "torch"})
    assert proc.returncode == 0, proc.stderr
    result = json.loads(out.read_text())
    rows = result["results"]
    assert set(rows) == {"ossforge_mxfp4", "ossforge", "grouped_mm"} and result["expert_format"] == "mxfp4"
    assert result["mxfp4_max_rel_diff_vs_bf16_ossforge"] < 1e-5 and result["max_rel_diff"] < 1e-5
    assert rows["ossforge_mxfp4"]["time_vs_bf16_ossforge"] > 0 and rows["ossforge_mxfp4"]["speedup_vs_grouped_mm"] > 0
    # fp32 dense experts (4 bytes) vs 4.25 bits per parameter
    ratio = rows["ossforge"]["expert_weights_mib"] / rows["ossforge_mxfp4"]["expert_weights_mib"]
    assert abs(ratio - 32 / 4.25) < 0.05 * 32 / 4.25
    bad = run_cli("bench", "moe", "--shape", "tiny", "--expert-format", "mxfp4")
    assert bad.returncode == 2 and "--expert-format" in bad.stderr
