"""The Alignment Layer of CA-SAM: a small residual module between the frozen encoder and decoder.

``H(Z) = LN(B3(LN(B2(LN(B1(Z))))))`` with three :class:`CAResBlock` blocks and one LayerNorm2d shared by
the blocks (CA-SAM's recipe, docs/method.md), served as ``A(Z) = Z + g·(H(Z) − Z)`` with a scalar gate ``g``
that starts at 0: a fresh layer reproduces plain SAM exactly, and training moves it away only as far as that
helps. (The paper's layer is ``g = 1``; without the gate a fresh layer's shared LayerNorm re-normalises the
neck's output and costs box IoU before any training.) :func:`describe` gives its size and cost.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn as nn

from casam.model.head import HEAD_PREFIX, RefineHead, split_head_state

# Number of CAResBlocks in a layer, as in the CA-SAM paper.
ALIGN_BLOCKS = 3


class LayerNorm2d(nn.Module):
    """LayerNorm over the channels of a B×C×H×W tensor (as in SAM)."""

    def __init__(self, channels: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        u = x.mean(1, keepdim=True)
        s = (x - u).pow(2).mean(1, keepdim=True)
        x = (x - u) / torch.sqrt(s + self.eps)
        return self.weight[:, None, None] * x + self.bias[:, None, None]


class ChannelAttention(nn.Module):
    """ECA-style channel attention: ``sigmoid(Conv1d_k(GAP(h)))`` over the channel axis.

    Args:
        kernel_size: width of the 1D convolution across channels (5 in CA-SAM).
    """

    def __init__(self, kernel_size: int = 5):
        super().__init__()
        self.conv = nn.Conv1d(1, 1, kernel_size, padding=kernel_size // 2, bias=False)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """Returns the B×C×1×1 channel weights of ``h`` (B×C×H×W)."""
        w = self.conv(h.mean(dim=(2, 3))[:, None, :])  # B×1×C
        return torch.sigmoid(w)[:, 0, :, None, None]


class CAResBlock(nn.Module):
    """Channel-attention residual block: ``h = conv(relu(conv(relu(x)))); return h·ECA(h) + x``.

    The second convolution starts at zero, so a fresh block is the identity and a new layer starts from
    the backbone's zero-shot behaviour (up to the shared LayerNorm).

    Args:
        channels: embedding channels (256 for SAM).
        kernel_size: ECA kernel width.
    """

    def __init__(self, channels: int = 256, kernel_size: int = 5):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)
        self.attn = ChannelAttention(kernel_size)
        nn.init.zeros_(self.conv2.weight)
        nn.init.zeros_(self.conv2.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(torch.relu(x))
        h = self.conv2(torch.relu(h))
        return h * self.attn(h) + x


class AlignmentLayer(nn.Module):
    """N CAResBlocks, each followed by one shared LayerNorm2d, blended into the input by a zero-started gate.

    Args:
        channels: embedding channels (256).
        blocks: number of blocks N (3 in CA-SAM).
        gate: initial gate (0: a fresh layer is the identity; 1: the paper's ungated layer).

    Shapes:
        B×C×H×W → B×C×H×W.
    """

    def __init__(self, channels: int = 256, blocks: int = ALIGN_BLOCKS, gate: float = 0.0):
        super().__init__()
        self.channels = channels
        self.blocks = nn.ModuleList(CAResBlock(channels) for _ in range(blocks))
        self.norm = LayerNorm2d(channels)
        self.gate = nn.Parameter(torch.full((1,), float(gate)))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = z
        for block in self.blocks:
            h = self.norm(block(h))
        return z + self.gate * (h - z)

    @property
    def head(self) -> Optional[RefineHead]:
        """The institution's refinement head (:mod:`casam.model.head`) stored with this layer, or None."""
        return self._modules.get("refine")

    def attach_head(self, head: Optional[RefineHead]) -> "AlignmentLayer":
        """Appends a refinement head to this layer (saved in the same file as ``head.*`` weights); None removes it."""
        if head is None:
            self._modules.pop("refine", None)
        else:
            self.add_module("refine", head)
        return self

    def state_dict(self, *args, **kwargs):
        """The layer's weights; a head's are under ``head.*`` (a layer without a head has none)."""
        state = super().state_dict(*args, **kwargs)
        head = {k: state.pop(k) for k in [k for k in state if k.startswith("refine.")]}
        state.update({HEAD_PREFIX + k[len("refine."):]: v for k, v in head.items()})
        return state

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """Loads weights, with a head when the state has ``head.*`` weights (:meth:`state_dict`'s layout)."""
        state_dict, head = split_head_state(dict(state_dict))  # the head comes loaded; the rest is the layer's own
        self.attach_head(None)
        result = super().load_state_dict(state_dict, strict=strict, assign=assign)
        self.attach_head(head)
        return result

    @torch.no_grad()
    def init_norm(self, weight: torch.Tensor, bias: torch.Tensor) -> "AlignmentLayer":
        """Starts the shared LayerNorm's affine at the backbone's last LayerNorm (its encoder neck).

        A fresh layer's blocks are the identity (zero second convolution), but the shared LayerNorm still
        re-normalises the embedding; with a unit affine that wipes out the neck's learned per-channel scale and
        shift and, once the gate opens, the decoder would see a foreign embedding. Starting from the neck's
        affine keeps the blocks' branch close to the frozen embedding, so the gate has a useful direction to
        open into.

        Args:
            weight: the neck LayerNorm's weight (C).
            bias: its bias (C).

        Returns:
            This layer.
        """
        self.norm.weight.copy_(weight.detach().to(self.norm.weight))
        self.norm.bias.copy_(bias.detach().to(self.norm.bias))
        return self


def fresh_layer(backbone, blocks: int = ALIGN_BLOCKS) -> AlignmentLayer:
    """A new Alignment Layer for ``backbone``: gate 0 (exactly plain SAM), random blocks, LayerNorm from its neck."""
    layer = AlignmentLayer(backbone.embed_dim, blocks)
    norm = backbone.output_norm()
    if norm is not None:
        layer.init_norm(*norm)
    return layer.to(backbone.device)


def count_parameters(module: nn.Module) -> int:
    """Returns the number of parameters of a module."""
    return sum(p.numel() for p in module.parameters())


def alignment_macs(channels: int = 256, size: int = 64, blocks: int = ALIGN_BLOCKS) -> int:
    """Multiply-accumulates of one Alignment Layer forward pass on one C×size×size embedding.

    Counts the 3×3 convolutions, the ECA convolution and the elementwise attention product (LayerNorm and
    ReLU are not multiply-accumulates and are left out, as MAC counters do).
    """
    conv = channels * channels * 9 * size * size
    per_block = 2 * conv + channels * 5 + channels * size * size
    return blocks * per_block + channels * size * size  # + the gate's blend


def describe(channels: int = 256, size: int = 64, blocks: int = ALIGN_BLOCKS) -> Tuple[int, float]:
    """Returns (parameter count, GMAC per image) of an Alignment Layer."""
    return count_parameters(AlignmentLayer(channels, blocks)), alignment_macs(channels, size, blocks) / 1e9
