"""SAM's mask decoder run for many prompts on one image embedding, its image-side work done once.

The decoder's weights and its arithmetic are SAM's (``segment_anything.modeling.MaskDecoder``, single-mask
output); only the order of the work changes, so the answer is the same up to float rounding (tested):

- Without a mask prompt the decoder's image tokens (embedding + "no mask" embedding) and their positional
  encoding are the same for every prompt. So are, in the first two-way attention block, the keys and values of
  the tokens-to-image attention and the queries of the image-to-tokens attention: they are computed once per
  embedding (:func:`decoder_context`), not once per prompt. The later blocks, where the image tokens differ per
  prompt, are SAM's own modules.
- The transformer's image tokens (N×C) are already an image in channels-last layout; the upscaling runs on
  that layout and the mask is the hypernetwork's product over the channel axis, with no copy back to
  channels-first. Only the single output mask (token 0) is computed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Tuple

import torch
from torch import nn


@dataclass
class DecoderContext:
    """The image-side tensors of the decoder for one embedding (see :func:`decoder_context`).

    Attributes:
        keys: 1×N×C image tokens (embedding + the "no mask" dense embedding).
        pe: 1×N×C positional encoding of the image tokens.
        k0, v0: 1×N×D keys and values of the first block's tokens-to-image attention.
        q0: 1×N×D queries of the first block's image-to-tokens attention.
        hw: (h, w) of the embedding.
    """

    keys: torch.Tensor
    pe: torch.Tensor
    k0: torch.Tensor
    v0: torch.Tensor
    q0: torch.Tensor
    hw: Tuple[int, int]


def decoder_context(sam: nn.Module, embedding: torch.Tensor) -> DecoderContext:
    """The decoder's image-side work for one embedding, done once for all its prompts.

    Args:
        sam: a ``segment_anything`` Sam (its prompt encoder and mask decoder are used).
        embedding: 1×C×h×w image embedding (possibly after an Alignment Layer; gradients flow through).

    Returns:
        The context for :func:`decode_with_context`.
    """
    pe, md = sam.prompt_encoder, sam.mask_decoder
    h, w = embedding.shape[-2:]
    dense = pe.no_mask_embed.weight.reshape(1, -1, 1, 1)  # what the prompt encoder adds without a mask prompt
    keys = (embedding[:1] + dense).flatten(2).permute(0, 2, 1)
    pos = pe.get_dense_pe().to(embedding.device).flatten(2).permute(0, 2, 1)
    first = md.transformer.layers[0]
    with_pe = keys + pos
    return DecoderContext(keys, pos, first.cross_attn_token_to_image.k_proj(with_pe),
                          first.cross_attn_token_to_image.v_proj(keys), first.cross_attn_image_to_token.q_proj(with_pe),
                          (int(h), int(w)))


def _attend(attn: nn.Module, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``segment_anything``'s Attention on already projected q, k, v (batch dimensions broadcast): its own head
    split and merge, scaled dot-product, softmax and out_proj."""
    q, k, v = (attn._separate_heads(x, attn.num_heads) for x in (q, k, v))
    out = torch.softmax((q @ k.permute(0, 1, 3, 2)) / math.sqrt(q.shape[-1]), dim=-1) @ v
    return attn.out_proj(attn._recombine_heads(out))


def decode_with_context(sam: nn.Module, ctx: DecoderContext, points: Optional[Tuple[torch.Tensor, torch.Tensor]],
                        boxes: Optional[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
    """SAM's single-mask decoding of K prompts on the embedding of ``ctx``.

    Args:
        sam: the Sam the context was made with.
        ctx: :func:`decoder_context` of the embedding.
        points: (K×N×2 coordinates, K×N labels) in the model input frame, or None.
        boxes: K×4 boxes in the model input frame, or None.

    Returns:
        (logits K×1×L×L, predicted IoU K×1), as ``MaskDecoder(..., multimask_output=False)`` gives them.
    """
    md, t = sam.mask_decoder, sam.mask_decoder.transformer
    sparse, _ = sam.prompt_encoder(points=points, boxes=boxes, masks=None)
    out_tokens = torch.cat([md.iou_token.weight, md.mask_tokens.weight], dim=0)
    tokens = torch.cat((out_tokens.unsqueeze(0).expand(sparse.size(0), -1, -1), sparse), dim=1)
    first, later = t.layers[0], t.layers[1:]
    # the first block (SAM skips the positional encoding in its self-attention), with the context's projections
    queries = first.norm1(first.self_attn(q=tokens, k=tokens, v=tokens))
    a, b = first.cross_attn_token_to_image, first.cross_attn_image_to_token
    queries = first.norm2(queries + _attend(a, a.q_proj(queries + tokens), ctx.k0, ctx.v0))
    queries = first.norm3(queries + first.mlp(queries))
    keys = first.norm4(ctx.keys + _attend(b, ctx.q0, b.k_proj(queries + tokens), b.v_proj(queries)))
    for layer in later:  # the image tokens now differ per prompt: SAM's own blocks
        queries, keys = layer(queries=queries, keys=keys, query_pe=tokens, key_pe=ctx.pe)
    final = t.final_attn_token_to_image
    queries = t.norm_final_attn(queries + final(q=queries + tokens, k=keys + ctx.pe, v=keys))
    n = queries.shape[0]
    h, w = ctx.hw
    image = keys.expand(n, -1, -1).reshape(n, h, w, -1).permute(0, 3, 1, 2)  # channels-last view, no copy
    up = md.output_upscaling(image)
    c, hh, ww = up.shape[1:]
    hyper = md.output_hypernetworks_mlps[0](queries[:, 1, :])  # mask token 0: the single-mask output
    logits = (up.permute(0, 2, 3, 1).reshape(n, hh * ww, c) @ hyper[:, :, None]).view(n, 1, hh, ww)
    return logits, md.iou_prediction_head(queries[:, 0, :])[:, :1]
