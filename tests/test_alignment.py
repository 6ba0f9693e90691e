import numpy as np
import pytest
import torch

from casam.model.alignment import AlignmentLayer, CAResBlock, alignment_macs, count_parameters, describe


def test_parameter_count_matches_method():
    layer = AlignmentLayer(256, 3)
    n = count_parameters(layer)
    print(f"Alignment Layer parameters: {n:,}")
    # 3 blocks × (2 conv3×3 256→256 with bias + ECA conv1d k5 without bias) + one shared LayerNorm2d(256)
    # + the scalar gate
    assert n == 3 * (2 * (256 * 256 * 9 + 256) + 5) + 2 * 256 + 1 == 3_541_008


def test_macs_about_14_5_gmac():
    params, gmac = describe()
    assert params == 3_541_008
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
    from casam.model.alignment import fresh_layer

    w, b = tiny.output_norm()
    layer = fresh_layer(tiny)
    assert torch.equal(layer.norm.weight, w) and torch.equal(layer.norm.bias, b)
    # the gate starts closed: a fresh layer is exactly the identity ...
    z = tiny.encode(tiny.prepare(np.full((40, 40), 120, np.uint8))[0])
    with torch.no_grad():
        assert torch.equal(layer(z), z)
        # ... and opened fully it is the paper's layer (blocks start as the identity: the neck's norm re-applied)
        layer.gate.fill_(1.0)
        assert torch.allclose(layer(z), layer.norm(layer.norm(layer.norm(z))), atol=1e-5)


def test_fresh_layer_gives_the_same_masks_as_plain_sam(tiny):
    from casam.model.alignment import fresh_layer

    rng = np.random.default_rng(0)
    z = tiny.encode(tiny.prepare(rng.integers(0, 255, (48, 64), dtype=np.uint8))[0])
    layer = fresh_layer(tiny)
    box = torch.tensor([[8.0, 10.0, 40.0, 30.0]])
    with torch.no_grad():
        plain, plain_iou = tiny.decode(z, boxes=box)
        aligned, aligned_iou = tiny.decode(layer(z), boxes=box)
    assert torch.equal(plain, aligned) and torch.equal(plain_iou, aligned_iou)


def test_a_layer_state_without_a_gate_is_refused():
    layer = AlignmentLayer(16, 3)
    state = {k: v for k, v in layer.state_dict().items() if k != "gate"}
    with pytest.raises(RuntimeError, match="gate"):
        AlignmentLayer(16, 3).load_state_dict(state)
