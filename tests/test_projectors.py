import pytest
import torch

from vlmkit.config import ProjectorConfig
from vlmkit.models.projectors import PROJECTORS, Projector, build_projector, register_projector


@pytest.mark.parametrize(
    ("config", "tokens_out"),
    [
        (ProjectorConfig(type="linear"), 49),
        (ProjectorConfig(type="mlp", depth=1), 49),
        (ProjectorConfig(type="mlp", depth=3), 49),
        (ProjectorConfig(type="resampler", num_queries=5, num_heads=4), 5),
    ],
)
def test_shapes_and_gradients(config, tokens_out):
    torch.manual_seed(0)
    projector = build_projector(config=config, in_dim=32, out_dim=24)
    features = torch.randn(3, 49, 32, requires_grad=True)
    out = projector(features)
    assert out.shape == (3, tokens_out, 24)
    assert projector.num_output_tokens(49) == tokens_out
    out.pow(2).sum().backward()
    for name, param in projector.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name
    assert features.grad.abs().sum() > 0


def test_mlp_depth_has_gelu_between_layers():
    projector = build_projector(config=ProjectorConfig(type="mlp", depth=2), in_dim=4, out_dim=6)
    x = torch.randn(1, 2, 4)
    expected = projector.linear_2(torch.nn.functional.gelu(projector.linear_1(x)))
    torch.testing.assert_close(projector(x), expected)


def test_resampler_count_is_independent_of_input_tokens():
    projector = build_projector(
        config=ProjectorConfig(type="resampler", num_queries=7, num_heads=2), in_dim=8, out_dim=16
    )
    for n in (1, 16, 300):
        assert projector(torch.randn(2, n, 8)).shape == (2, 7, 16)


def test_resampler_rows_are_independent():
    projector = build_projector(
        config=ProjectorConfig(type="resampler", num_queries=3, num_heads=2), in_dim=8, out_dim=8
    )
    a, b = torch.randn(1, 10, 8), torch.randn(1, 10, 8)
    both = projector(torch.cat([a, b]))
    torch.testing.assert_close(both[1:], projector(b), atol=1e-6, rtol=1e-5)


def test_registry_adds_a_projector_in_one_line():
    @register_projector("test-identity")
    class Identity(Projector):
        def forward(self, features):
            return features

    try:
        projector = build_projector(config=ProjectorConfig(type="test-identity"), in_dim=4, out_dim=4)
        assert isinstance(projector, Identity)
        with pytest.raises(ValueError, match="already registered"):
            register_projector("test-identity")(Identity)
    finally:
        PROJECTORS.pop("test-identity")


def test_unknown_projector_lists_known():
    with pytest.raises(
        ValueError, match="unknown projector type 'nope'.*cross-attn, linear, mlp, pixel-shuffle, resampler"
    ):
        build_projector(config=ProjectorConfig(type="nope"), in_dim=4, out_dim=4)
