"""gpt-oss attention for training: document boundaries for packed rows, and flex attention with sinks.

Applied to a model with :func:`apply_attention`, never woven into it:

- A forward pre-hook on ``GptOssModel`` turns ``(attention_mask, position_ids)`` into one mask per layer
  type, so packed rows never attend across documents and sliding-window layers keep their window inside
  each document. A document starts wherever ``position_ids`` restarts at 0; padding tokens (attention
  mask 0) each become a document of their own, so no query row is empty. The masks come from
  transformers' own machinery (``create_causal_mask`` / ``create_sliding_window_causal_mask`` detect packed
  rows from ``position_ids`` when given no 2-D mask); gpt-oss 5.24 does not pass ``position_ids`` to
  them, which is why the hook exists. Eager attention gets a block-diagonal 4-D mask, flex a ``BlockMask``
  whose empty blocks are skipped (linear in the document lengths, not the row length).
- ``training.attention: flex`` registers :func:`flex_sink_attention` with transformers'
  ``AttentionInterface``: PyTorch flex attention (fused, O(S) memory, forward and backward) over the
  scores alone, then the sinks by renormalising through the log-sum-exp (:func:`sink_renormalise`).
  Transformers' own ``flex_attention`` integration does the same renormalisation, but refuses sinks on
  CPU and rounds the LSE to bf16 before renormalising; this one keeps it in fp32.

:func:`reference_attention` is the torch reference of the flex path (dense scores, same renormalisation)
and :func:`eager_sink_attention` the stock eager formula (softmax over ``[scores, sink]``), for tests and
:func:`gpu_selfcheck`.
"""

from __future__ import annotations

import math

import torch

IMPLEMENTATIONS = ("auto", "eager", "flex")
FLEX = "ossforge_flex"  # the name registered with transformers' AttentionInterface


# ----------------------------------------------------------------------------- choosing


def resolve_attention(choice: str, device: torch.device | str) -> str:
    """``auto`` -> ``flex`` on CUDA (when torch has flex attention), ``eager`` elsewhere."""
    device = torch.device(device)
    if choice == "auto":
        return "flex" if device.type == "cuda" and _has_flex() else "eager"
    if choice == "flex" and device.type != "cuda":
        from ossforge.errors import UserError

        # torch's FlexAttention has no backward on CPU (it raises for inputs that require grad)
        raise UserError("training.attention: flex needs a CUDA device (FlexAttention has no backward on CPU); "
                        "use auto or eager")
    if choice not in IMPLEMENTATIONS:
        raise ValueError(f"unknown attention implementation {choice!r}")
    return choice


def _has_flex() -> bool:
    try:
        from torch.nn.attention.flex_attention import AuxRequest, flex_attention  # noqa: F401
    except ImportError:
        return False
    return True


def apply_attention(model, implementation: str = "eager"):
    """Run ``model``'s attention as ``implementation`` (``eager`` or ``flex``; ``auto`` resolved from the
    model's device) with document-aware masks, in place. Idempotent."""
    if implementation == "auto":
        implementation = resolve_attention("auto", next(model.parameters()).device)
    if implementation == "flex":
        _register_flex()
    name = FLEX if implementation == "flex" else "eager"
    for module in model.modules():
        config = getattr(module, "config", None)
        if config is not None and type(config).__name__ == "GptOssConfig":
            config._attn_implementation = name
        if type(module).__name__ == "GptOssModel" and not getattr(module, "_ossforge_document_masks", False):
            module.register_forward_pre_hook(_document_masks_hook, with_kwargs=True)
            module._ossforge_document_masks = True
    return model


# ----------------------------------------------------------------------------- masks


def mask_positions(position_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """``position_ids`` with every padding token at 0: each becomes its own one-token document."""
    if attention_mask is None:
        return position_ids
    return torch.where(attention_mask.bool(), position_ids.expand_as(attention_mask), 0)


def document_masks(config, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor | None,
                   position_ids: torch.Tensor) -> dict:
    """``{"full_attention": mask, "sliding_attention": mask}`` for rows whose documents restart
    ``position_ids`` at 0, in the form ``config._attn_implementation`` takes."""
    from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

    # No 2-D mask: transformers then reads documents from position_ids (find_packed_sequence_indices);
    # padding is folded into those positions above, so nothing is lost.
    kwargs = dict(config=config, inputs_embeds=inputs_embeds, attention_mask=None, cache=None,
                  position_ids=mask_positions(position_ids, attention_mask))
    return {"full_attention": create_causal_mask(**kwargs),
            "sliding_attention": create_sliding_window_causal_mask(**kwargs)}


def _document_masks_hook(module, args, kwargs):
    """Before ``GptOssModel.forward`` (called with keywords, as ``GptOssForCausalLM`` does): document-aware
    masks from ``position_ids``. Generation with a cache is left to transformers."""
    position_ids, attention_mask = kwargs.get("position_ids"), kwargs.get("attention_mask")
    if args or position_ids is None or isinstance(attention_mask, dict) or kwargs.get("use_cache") \
            or kwargs.get("cache") is not None or kwargs.get("past_key_values") is not None:
        return None
    embeds = kwargs.get("inputs_embeds")
    if embeds is None:  # create_*_mask read only shape, dtype and device from inputs_embeds
        embeds = module.embed_tokens.weight.new_empty((*kwargs["input_ids"].shape, 0))
    kwargs = dict(kwargs, attention_mask=document_masks(module.config, embeds, attention_mask, position_ids))
    return args, kwargs


# ----------------------------------------------------------------------------- flex attention with sinks


def sink_renormalise(out: torch.Tensor, lse: torch.Tensor, sinks: torch.Tensor) -> torch.Tensor:
    """Attention output over ``[scores, sink]`` from the output and log-sum-exp over the scores alone.

    softmax([s, sink])[:-1] = exp(s - lse') with lse' = logaddexp(lse, sink), so the output scales by
    exp(lse - lse') = sigmoid(lse - sink). Gradients reach q and k through ``lse`` too (the kernel must
    back-propagate its LSE), and the sinks through the factor. ``out`` [B, H, S, D], ``lse`` [B, H, S].
    """
    wide = torch.promote_types(out.dtype, torch.float32)  # fp32 at least (bf16 outputs), fp64 stays
    factor = torch.sigmoid(lse.to(wide) - sinks.to(wide).view(1, -1, 1))
    return (out.to(wide) * factor.unsqueeze(-1)).to(out.dtype)


_compiled_flex = None


def _flex_kernel(device_type: str):
    """Compiled flex attention on CUDA (fused kernel; compiled once per process); the eager
    implementation elsewhere (CPU: forward only, materialises the scores)."""
    global _compiled_flex
    from torch.nn.attention.flex_attention import flex_attention

    if device_type != "cuda":
        return flex_attention
    if _compiled_flex is None:
        # dynamic shapes: rows are padded to each batch's longest, and a recompile per length would
        # soon hit dynamo's cache limit and fall back to the unfused (O(S^2)) implementation
        _compiled_flex = torch.compile(flex_attention)
    return _compiled_flex


def flex_sink_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, s_aux=None,
                        sliding_window=None, **kwargs):
    """transformers attention function (``AttentionInterface``): flex attention over a ``BlockMask``
    (documents, causality and the window live in it), then the sinks. Returns ``(out [B, S, H, D], None)``."""
    from torch.nn.attention.flex_attention import AuxRequest

    if dropout:
        raise ValueError("flex attention with sinks has no attention dropout; set attention_dropout 0")
    flex = _flex_kernel(query.device.type)
    out, aux = flex(query, key, value, block_mask=attention_mask, scale=scaling,
                    enable_gqa=key.shape[1] != query.shape[1], return_aux=AuxRequest(lse=True))
    if s_aux is not None:
        out = sink_renormalise(out, aux.lse, s_aux)
    return out.transpose(1, 2).contiguous(), None


def flex_block_mask(batch_size, q_length, kv_length, q_offset=0, kv_offset=0, mask_function=None,
                    attention_mask=None, device="cpu", **kwargs):
    """transformers mask function (``AttentionMaskInterface``) for :data:`FLEX`: transformers' own
    ``flex_attention_mask``, but compiled only on CUDA (on CPU torch.compile would only cost time)."""
    from torch.nn.attention.flex_attention import create_block_mask
    from transformers.masking_utils import (add_offsets_to_mask_function, and_masks, causal_mask_function,
                                            fast_all, padding_mask_function, prepare_padding_mask)

    mask_function = mask_function or causal_mask_function
    if attention_mask is not None and not fast_all(attention_mask):
        padding = prepare_padding_mask(attention_mask, kv_length, kv_offset)
        mask_function = and_masks(mask_function, padding_mask_function(padding))
    mask_function = add_offsets_to_mask_function(mask_function, q_offset, kv_offset)
    return create_block_mask(mask_function, batch_size, None, q_length, kv_length, device=device,
                             _compile=torch.device(device).type == "cuda")


def _register_flex() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

    AttentionInterface.register(FLEX, flex_sink_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(FLEX, flex_block_mask)


# ----------------------------------------------------------------------------- references


def allowed(document_ids: torch.Tensor, window: int | None) -> torch.Tensor:
    """[B, S, S] bool: query i may see key j (same document, j <= i, and i - j < window)."""
    S = document_ids.shape[-1]
    i = torch.arange(S, device=document_ids.device)
    ok = (document_ids[:, :, None] == document_ids[:, None, :]) & (i[None, :, None] >= i[None, None, :])
    if window is not None:
        ok &= (i[:, None] - i[None, :] < window)[None]
    return ok


def eager_sink_attention(query, key, value, sinks, allowed_mask, scaling):
    """The stock gpt-oss formula: softmax over ``[masked scores, sink]``, sink column dropped."""
    groups = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(groups, 1), value.repeat_interleave(groups, 1)
    scores = (query @ key.transpose(-1, -2)) * scaling
    scores = scores.masked_fill(~allowed_mask[:, None], torch.finfo(scores.dtype).min)
    sink = sinks.to(scores.dtype).view(1, -1, 1, 1).expand(*scores.shape[:-1], 1)
    probs = torch.softmax(torch.cat([scores, sink], dim=-1), dim=-1)[..., :-1]
    return probs.to(value.dtype) @ value


def reference_attention(query, key, value, sinks, allowed_mask, scaling):
    """Torch reference of the flex path: output and LSE over the scores alone, then
    :func:`sink_renormalise`. Same semantics as :func:`flex_sink_attention`, dense memory."""
    groups = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(groups, 1), value.repeat_interleave(groups, 1)
    scores = ((query @ key.transpose(-1, -2)) * scaling).to(torch.promote_types(query.dtype, torch.float32))
    scores = scores.masked_fill(~allowed_mask[:, None], float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    out = torch.softmax(scores, dim=-1).to(value.dtype) @ value
    return sink_renormalise(out, lse, sinks)


def document_ids_of(position_ids: torch.Tensor) -> torch.Tensor:
    """Document index of every token: a new document wherever ``position_ids`` restarts at 0."""
    return (position_ids == 0).long().cumsum(-1)


# ----------------------------------------------------------------------------- GPU check


def gpu_selfcheck(device: str = "cuda") -> dict:
    """Flex attention with sinks (packed documents, 128-token window and full layers) against the eager
    formula on a GPU, fp32 and bf16: max abs error of the output and of the q, k, v and sink gradients,
    each relative to the reference's max, and whether all are within tolerance. Small sizes (seconds)."""
    from torch.nn.attention.flex_attention import create_block_mask

    _register_flex()
    gen = torch.Generator(device="cpu").manual_seed(0)
    B, H, KV, D, S = 2, 8, 2, 64, 512
    lengths = [[200, 312], [512]]
    position_ids = torch.stack([torch.cat([torch.arange(n) for n in row]) for row in lengths]).to(device)
    docs = document_ids_of(position_ids)
    result = {"shape": {"batch": B, "heads": H, "kv_heads": KV, "head_dim": D, "seq": S, "documents": lengths}}
    ok = True
    for dtype, tol in ((torch.float32, 2e-4), (torch.bfloat16, 3e-2)):
        for window in (128, None):
            q = torch.randn(B, H, S, D, generator=gen).to(device, dtype).requires_grad_()
            k = torch.randn(B, KV, S, D, generator=gen).to(device, dtype).requires_grad_()
            v = torch.randn(B, KV, S, D, generator=gen).to(device, dtype).requires_grad_()
            sinks = torch.randn(H, generator=gen).to(device, dtype).requires_grad_()
            grad_out = torch.randn(B, S, H, D, generator=gen).to(device, dtype)

            def mask_mod(b, h, qi, ki, window=window):
                keep = (docs[b, qi] == docs[b, ki]) & (qi >= ki)
                return keep & (qi - ki < window) if window else keep

            block_mask = create_block_mask(mask_mod, B, None, S, S, device=device)
            out, _ = flex_sink_attention(None, q, k, v, block_mask, scaling=D ** -0.5, s_aux=sinks)
            grads = torch.autograd.grad(out, (q, k, v, sinks), grad_out)

            leaves = [t.detach().double().requires_grad_() for t in (q, k, v, sinks)]
            ref = eager_sink_attention(*leaves, allowed(docs, window), D ** -0.5).transpose(1, 2)
            ref_grads = torch.autograd.grad(ref, leaves, grad_out.double())
            errors = {}
            for name, got, want in zip(("out", "dq", "dk", "dv", "dsinks"), (out, *grads), (ref, *ref_grads)):
                errors[name] = float((got.double() - want).abs().max() / want.abs().max().clamp(min=1e-12))
            passed = all(e <= tol for e in errors.values()) and all(math.isfinite(e) for e in errors.values())
            ok &= passed
            key = f"{str(dtype).replace('torch.', '')}_{'window128' if window else 'full'}"
            result[key] = {"relative_max_error": errors, "tolerance": tol, "passed": passed}
    result["passed"] = ok
    return result
