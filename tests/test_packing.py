"""Packing with document boundaries: packed rows restart ``position_ids`` at every conversation and
attention (sliding windows included) never crosses them, so packing changes no loss."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tests.conftest import REPO

DATA = REPO / "tests" / "fixtures" / "train" / "dosing_small.jsonl"
SEQ_LEN = 400  # 2-3 conversations (67-155 tokens) per packed row
WINDOW = 16  # sliding window far below every conversation's length: the window rule is exercised


def _sets():
    from ossforge.finetune.data import build_examples

    packed, _ = build_examples(DATA, SEQ_LEN, packing=True)
    unpacked, _ = build_examples(DATA, SEQ_LEN)
    return packed, unpacked


def _model(**overrides):
    from ossforge.model.attention import apply_attention
    from ossforge.model.presets import build_random

    # initializer_range 0.2: peaked attention and logits, so a mask that crosses documents shows
    return apply_attention(build_random("tiny", seed=0, sliding_window=WINDOW, initializer_range=0.2, **overrides),
                           "eager")


def test_collate_restarts_positions_per_document():
    from ossforge.finetune.trainer import collate

    packed, unpacked = _sets()
    assert max(e["position_ids"].count(0) for e in packed) >= 3, "fixture must pack 3 conversations in a row"
    batch = collate(packed[:2], "cpu")
    assert set(batch) == {"input_ids", "labels", "attention_mask", "position_ids"}
    for row, e in enumerate(packed[:2]):
        n = len(e["input_ids"])
        assert batch["position_ids"][row, :n].tolist() == e["position_ids"]
        assert not batch["position_ids"][row, n:].any() and not batch["attention_mask"][row, n:].any()
    starts = [i for i, p in enumerate(packed[0]["position_ids"]) if p == 0]
    lengths = [b - a for a, b in zip(starts, starts[1:] + [len(packed[0]["input_ids"])])]
    assert [len(e["input_ids"]) for e in unpacked[:len(lengths)]] == lengths
    plain = collate(unpacked[:2], "cpu")["position_ids"]
    assert plain[0, :len(unpacked[0]["input_ids"])].tolist() == list(range(len(unpacked[0]["input_ids"])))


def test_packed_eval_loss_equals_unpacked():
    """Token-weighted: evaluate_loss of the packed set == of the same conversations one by one (fp32)."""
    from ossforge.finetune.trainer import evaluate_loss

    packed, unpacked = _sets()
    model = _model()
    packed_loss = evaluate_loss(model, packed, 2, "cpu")  # micro-batch 2: padding inside packed batches
    unpacked_loss = evaluate_loss(model, unpacked, 3, "cpu")
    assert abs(packed_loss - unpacked_loss) <= 1e-5, (packed_loss, unpacked_loss)

    # The old behaviour (one causal mask over the row, positions running on) changes the loss: this
    # test can fail.
    crossing = [{"input_ids": e["input_ids"], "labels": e["labels"]} for e in packed]
    assert abs(evaluate_loss(model, crossing, 2, "cpu") - unpacked_loss) > 1e-3


def _token_losses(model, batch) -> list[torch.Tensor]:
    """Per row, the loss of every trained token (in order)."""
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                       position_ids=batch["position_ids"], use_cache=False).logits
    out = []
    for row in range(logits.shape[0]):
        labels = batch["labels"][row, 1:]
        keep = labels != -100
        out.append(F.cross_entropy(logits[row, :-1][keep].float(), labels[keep], reduction="none"))
    return out


@pytest.mark.slow
def test_trained_model_packed_and_unpacked_token_losses_agree(tmp_path):
    """Train with data.packing: true, reload base + adapter, and compare every document's per-token
    losses inside packed rows with the same conversation alone."""
    import yaml
    from peft import PeftModel

    from ossforge.finetune.config import load_config
    from ossforge.finetune.trainer import collate, train
    from ossforge.model.attention import apply_attention
    from ossforge.model.checkpoint import load_folder

    cfg = {"model": {"preset": "tiny"}, "data": {"train": str(DATA), "packing": True},
           "lora": {"r": 4, "alpha": 8},
           "training": {"max_steps": 3, "lr": 5e-3, "micro_batch_size": 2, "seq_len": SEQ_LEN, "seed": 1,
                        "attention": "auto", "loss": "auto"},
           "output_dir": str(tmp_path / "run")}
    path = tmp_path / "packed.yaml"
    path.write_text(yaml.safe_dump(cfg))
    result = train(load_config(path), config_path=str(path))
    assert result.steps == 3

    base = load_folder(result.run_dir / "base")
    model = apply_attention(PeftModel.from_pretrained(base, str(result.run_dir / "adapter")), "eager")
    lora_b = [p for n, p in model.named_parameters() if "lora_B" in n]
    assert lora_b and any(p.abs().max() > 0 for p in lora_b), "training must have moved the adapter"
    assert model.config.sliding_window < 67  # tiny's window is below every conversation's length

    packed, unpacked = _sets()
    alone = [t for e in unpacked for t in _token_losses(model, collate([e], "cpu"))]
    inside = []
    for i in range(0, len(packed), 2):
        batch = collate(packed[i:i + 2], "cpu")
        for row, e in enumerate(packed[i:i + 2]):
            losses = _token_losses(model, batch)[row]
            # split the row's trained tokens by document
            labels = batch["labels"][row, 1:]
            docs = (batch["position_ids"][row] == 0).long().cumsum(0)[:-1][labels != -100]
            inside += [losses[docs == d] for d in docs.unique()]
    assert len(inside) == len(alone) == len(unpacked)
    for got, want in zip(inside, alone):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
