import numpy as np
import torch

from casam.alignment import AlignmentLayer, CAResBlock, alignment_macs, count_parameters, describe


def test_parameter_count_matches_method():
    layer = AlignmentLayer(256, 3)
    n = count_parameters(layer)
    print(f"Alignment Layer parameters: {n:,}")
    # 3 blocks × (2 conv3×3 256→256 with bias + ECA conv1d k5 without bias) + one shared LayerNorm2d(256)
    assert n == 3 * (2 * (256 * 256 * 9 + 256) + 5) + 2 * 256 == 3_541_007


def test_macs_about_14_5_gmac():
    params, gmac = describe()
    assert params == 3_541_007
    assert 14.4 < gmac < 14.6
    assert abs(alignment_macs(256, 32) * 4 / alignment_macs(256, 64) - 1) < 1e-3


def test_shapes_and_shared_norm():
    layer = AlignmentLayer(32, 3)
    z = torch.randn(2, 32, 8, 8)
    assert layer(z).shape == z.shape
    assert sum(1 for m in layer.modules() if type(m).__name__ == "LayerNorm2d") == 1


def test_fresh_block_is_identity_and_trains():
    block = CAResBlock(16)
    x = torch.randn(1, 16, 5, 5)
    assert torch.equal(block(x), x)
    block(x).pow(2).sum().backward()
    assert block.conv2.weight.grad.abs().sum() > 0


def test_fresh_layer_starts_from_the_backbone_neck(tiny):
    from casam.alignment import fresh_layer

    w, b = tiny.output_norm()
    layer = fresh_layer(tiny)
    assert torch.equal(layer.norm.weight, w) and torch.equal(layer.norm.bias, b)
    # the blocks start as the identity, so a fresh layer only re-applies the neck's normalisation
    z = tiny.encode(tiny.prepare(np.full((40, 40), 120, np.uint8))[0])
    with torch.no_grad():
        assert torch.allclose(layer(z), layer.norm(layer.norm(layer.norm(z))), atol=1e-5)
