import pytest
import torch
from torch import nn

from nnclr_fast.recipe.models import (
    NNCLR,
    FeatureExtractor,
    ImageEncoder,
    PredictionHead,
    ProjectionHead,
    SmallConvEncoder,
    build_backbone,
    build_feature_extractor,
)


def _layers(module, kind):
    return [m for m in module.modules() if isinstance(m, kind)]


def test_projection_head_matches_the_paper_by_default():
    head = ProjectionHead(512)
    linears = _layers(head, nn.Linear)
    assert [(layer.in_features, layer.out_features) for layer in linears] == [(512, 2048), (2048, 2048), (2048, 256)]
    # Batch norm after every linear layer, the last one included; ReLU only between layers.
    assert [b.num_features for b in _layers(head, nn.BatchNorm1d)] == [2048, 2048, 256]
    assert len(_layers(head, nn.ReLU)) == 2
    assert isinstance(head.net[-1], nn.BatchNorm1d)
    assert head(torch.randn(4, 512)).shape == (4, 256)


def test_prediction_head_matches_the_paper_by_default():
    head = PredictionHead()
    linears = _layers(head, nn.Linear)
    assert [(layer.in_features, layer.out_features) for layer in linears] == [(256, 4096), (4096, 256)]
    assert [b.num_features for b in _layers(head, nn.BatchNorm1d)] == [4096]
    assert isinstance(head.net[-1], nn.Linear)
    assert head(torch.randn(3, 256)).shape == (3, 256)


def test_head_sizes_are_configurable():
    proj = ProjectionHead(32, hidden_dim=64, out_dim=16, num_layers=2)
    assert [(layer.in_features, layer.out_features) for layer in _layers(proj, nn.Linear)] == [(32, 64), (64, 16)]
    pred = PredictionHead(16, hidden_dim=48, out_dim=16)
    assert [(layer.in_features, layer.out_features) for layer in _layers(pred, nn.Linear)] == [(16, 48), (48, 16)]
    with pytest.raises(ValueError, match="num_layers"):
        ProjectionHead(8, num_layers=0)


def test_nnclr_wraps_any_backbone_and_returns_h_z_p():
    backbone = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 20))
    model = NNCLR(ImageEncoder(backbone, 20, [0.5] * 3, [0.25] * 3), proj_hidden_dim=32, proj_dim=12, pred_hidden_dim=24)
    h, z, p = model(torch.rand(5, 3, 8, 8))
    assert h.shape == (5, 20) and z.shape == (5, 12) and p.shape == (5, 12)


def test_small_encoder_is_the_keras_four_conv_encoder():
    enc = SmallConvEncoder(in_channels=1, image_size=16, width=24)
    convs = _layers(enc, nn.Conv2d)
    assert len(convs) == 4
    assert all(c.kernel_size == (3, 3) and c.stride == (2, 2) for c in convs)
    assert enc(torch.rand(2, 1, 16, 16)).shape == (2, 24)
    assert _layers(SmallConvEncoder(3, 32, 8, batch_norm=True), nn.BatchNorm2d)
    # Without the dense layer the features are the flattened last feature map (2x2 at 32x32).
    bare = SmallConvEncoder(3, 32, 8, dense=False)
    assert not _layers(bare, nn.Linear) and bare.out_dim == 32
    assert bare(torch.rand(2, 3, 32, 32)).shape == (2, 32)
    with pytest.raises(ValueError, match="image_size"):
        SmallConvEncoder(image_size=8)


@pytest.mark.parametrize("size, maxpool", [(32, False), (96, True)])
def test_resnet18_stem_is_adapted_to_small_inputs(size, maxpool):
    net, dim = build_backbone("resnet18", in_channels=3, image_size=size)
    assert dim == 512
    assert net.conv1.kernel_size == (3, 3) and net.conv1.stride == (1, 1)
    assert isinstance(net.maxpool, nn.MaxPool2d) == maxpool
    assert net(torch.rand(2, 3, size, size)).shape == (2, 512)


def test_resnet50_and_grayscale_input_are_built_without_downloading(monkeypatch):
    import torch.hub

    def no_network(*args, **kwargs):
        raise AssertionError("a backbone tried to download weights")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", no_network)
    net, dim = build_backbone("resnet50", in_channels=1, image_size=32)
    assert dim == 2048
    assert net.conv1.in_channels == 1
    assert net(torch.rand(2, 1, 32, 32)).shape == (2, 2048)
    big, _ = build_backbone("resnet18", in_channels=3, image_size=224)
    assert big.conv1.kernel_size == (7, 7)


def test_unknown_backbone_is_a_value_error_naming_it():
    with pytest.raises(ValueError, match="'vgg11'"):
        build_backbone("vgg11")


def _spec(**over):
    spec = dict(backbone="small", in_channels=1, image_size=16, width=8, batch_norm=False, dense=True, mean=[0.3], std=[0.2])
    spec.update(over)
    return spec


def test_feature_extractor_takes_uint8_or_float_at_any_size():
    fe = build_feature_extractor(_spec()).eval()
    images = torch.randint(0, 256, (3, 1, 8, 8), dtype=torch.uint8)
    with torch.no_grad():
        from_uint8 = fe(images)
        from_float = fe(images.float() / 255)
    assert from_uint8.shape == (3, 8)
    torch.testing.assert_close(from_uint8, from_float)


def test_normalisation_statistics_are_part_of_the_encoder():
    fe = build_feature_extractor(_spec(mean=[0.5], std=[0.25]))
    state = fe.encoder.state_dict()
    assert float(state["normalize.mean"]) == 0.5 and float(state["normalize.std"]) == 0.25
    x = torch.full((1, 1, 16, 16), 0.75)
    assert torch.allclose(fe.encoder.normalize(x), torch.ones_like(x))


def test_feature_extractor_spec_is_checked():
    with pytest.raises(ValueError, match="missing"):
        build_feature_extractor({"backbone": "small"})
    with pytest.raises(ValueError, match="channel means"):
        build_feature_extractor(_spec(mean=[0.1, 0.2, 0.3], std=[1, 1, 1]))
    assert isinstance(build_feature_extractor(_spec()), FeatureExtractor)


def _sequential():
    return nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, 20), nn.ReLU())


def test_nnclr_takes_a_plain_sequential_backbone_with_an_explicit_feature_dim():
    model = NNCLR(_sequential(), feature_dim=20, proj_hidden_dim=32, proj_dim=12, pred_hidden_dim=24)
    assert model.feature_dim == 20
    assert model.projector.net[0].in_features == 20
    h, z, p = model(torch.rand(5, 3, 4, 4))
    assert h.shape == (5, 20) and z.shape == (5, 12) and p.shape == (5, 12)
    with pytest.raises(ValueError, match="feature_dim"):
        NNCLR(_sequential(), feature_dim=0)


def test_nnclr_infers_the_feature_dim_of_a_sequential_backbone_on_the_first_batch():
    model = NNCLR(_sequential(), proj_hidden_dim=32, proj_dim=12, pred_hidden_dim=24)
    with pytest.raises(RuntimeError, match="Sequential encoder is not known until the first forward.*feature_dim="):
        _ = model.feature_dim
    optimizer = torch.optim.AdamW(model.parameters())
    h, z, p = model(torch.rand(5, 3, 4, 4))
    assert model.feature_dim == 20 and z.shape == (5, 12)
    p.square().sum().backward()
    optimizer.step()
    # Once sized it is an ordinary model: its state dict loads into one given the size.
    sized = NNCLR(_sequential(), feature_dim=20, proj_hidden_dim=32, proj_dim=12, pred_hidden_dim=24)
    sized.load_state_dict(model.state_dict())


def test_nnclr_reads_the_feature_dim_of_an_image_encoder():
    fe = build_feature_extractor(_spec(width=8))
    assert NNCLR(fe.encoder, proj_hidden_dim=16, proj_dim=4, pred_hidden_dim=16).feature_dim == 8
