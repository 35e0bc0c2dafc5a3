"""Connectors: output shapes for every rule, token handling, errors and gradients."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from kdkit.connectors import build_connector, grid_tokens, token_grid, tokens_to_map
from kdkit.errors import KdkitError

S = torch.Size


def connect(src: tuple[int, ...], dst: tuple[int, ...]) -> nn.Module:
    return build_connector(S(src), S(dst), "s_tap", "t_tap")


def test_equal_shapes_give_identity_without_parameters():
    # batch sizes differ: only non-batch dims matter
    conn = connect((8, 16, 4, 4), (2, 16, 4, 4))
    assert isinstance(conn, nn.Identity)
    assert not list(conn.parameters())


@pytest.mark.parametrize(
    ("src", "dst", "n_params"),
    [
        ((2, 8, 8, 8), (2, 16, 4, 4), 3),  # conv weight + BN weight/bias, then resize
        ((2, 8, 8, 8), (2, 16, 8, 8), 3),  # conv + BN only
        ((2, 8, 8, 8), (2, 8, 4, 4), 0),  # resize only
        ((2, 8, 4, 4), (2, 8, 7, 5), 0),  # upsampling, non-square
    ],
)
def test_map_to_map(src, dst, n_params):
    conn = connect(src, dst)
    assert len(list(conn.parameters())) == n_params
    assert conn(torch.randn(3, *src[1:])).shape == (3, *dst[1:])


def test_map_resize_is_bilinear_without_aligned_corners():
    x = torch.randn(2, 3, 8, 8)
    out = connect((2, 3, 8, 8), (2, 3, 4, 4))(x)
    expected = nn.functional.interpolate(x, size=(4, 4), mode="bilinear", align_corners=False)
    torch.testing.assert_close(out, expected)


def test_vector_to_vector_is_linear_plus_batchnorm():
    conn = connect((4, 64), (4, 128))
    assert isinstance(conn[0], nn.Linear) and isinstance(conn[1], nn.BatchNorm1d)
    assert conn(torch.randn(5, 64)).shape == (5, 128)


def test_token_grid_rule():
    assert token_grid(64) == (8, 0)
    assert token_grid(197) == (14, 1)  # ViT-B/16: class token
    assert token_grid(201) == (14, 5)  # class + 4 register tokens
    assert token_grid(35) is None  # 35..27 holds no square


def test_tokens_with_class_token_to_map():
    tokens = torch.randn(2, 65, 32)  # 1 class token + 8x8 grid
    conn = connect((2, 65, 32), (2, 64, 4, 4))
    assert conn(tokens).shape == (2, 64, 4, 4)
    # same channels and grid: a pure reshape of the grid tokens, class token dropped
    folded = connect((2, 65, 32), (2, 32, 8, 8))(tokens)
    assert not list(connect((2, 65, 32), (2, 32, 8, 8)).parameters())
    torch.testing.assert_close(folded[:, :, 2, 3], tokens[:, 1 + 2 * 8 + 3])
    changed = tokens.clone()
    changed[:, 0] += 100.0
    torch.testing.assert_close(tokens_to_map(changed), tokens_to_map(tokens))


def test_map_to_tokens_returns_grid_tokens():
    conn = connect((2, 32, 8, 8), (2, 17, 64))  # teacher: class token + 4x4 grid
    out = conn(torch.randn(2, 32, 8, 8))
    assert out.shape == (2, 16, 64)
    teacher = torch.randn(2, 17, 64)
    torch.testing.assert_close(grid_tokens(teacher), teacher[:, 1:])
    assert grid_tokens(teacher).shape == out.shape


def test_map_to_tokens_keeps_row_major_grid_order():
    x = torch.randn(1, 4, 3, 3)
    out = connect((1, 4, 3, 3), (1, 10, 4))(x)  # 9 grid tokens + 1 extra, same channels
    torch.testing.assert_close(out[0, 1 * 3 + 2], x[0, :, 1, 2])


def test_tokens_to_tokens_linear_on_channels():
    conn = connect((2, 50, 32), (2, 50, 48))
    assert isinstance(conn, nn.Linear)
    assert conn(torch.randn(3, 50, 32)).shape == (3, 50, 48)


@pytest.mark.parametrize(
    ("src", "dst", "fragments"),
    [
        ((2, 64), (2, 256, 8, 8), ["(B, 64)", "(B, 256, 8, 8)", "vector", "map"]),
        ((2, 256, 8, 8), (2, 64), ["(B, 256, 8, 8)", "(B, 64)"]),
        ((2, 35, 32), (2, 32, 8, 8), ["35 tokens", "square grid"]),
        ((2, 32, 8, 8), (2, 35, 32), ["35 tokens", "square grid"]),
        ((2, 50, 32), (2, 65, 32), ["token counts differ"]),
    ],
)
def test_unbridgeable_shapes_raise(src, dst, fragments):
    with pytest.raises(KdkitError) as info:
        build_connector(S(src), S(dst), "fc:input", "layer3")
    message = str(info.value)
    assert message.startswith("cannot connect student tap 'fc:input'")
    assert "teacher tap 'layer3'" in message
    for fragment in fragments:
        assert fragment in message


def test_exact_error_message_for_vector_to_map():
    with pytest.raises(KdkitError, match=r"^cannot connect student tap 'fc:input' \(B, 64\) to teacher tap "):
        build_connector(S((8, 64)), S((8, 256, 8, 8)), "fc:input", "layer3")


@pytest.mark.parametrize(
    ("src", "dst"),
    [
        ((2, 8, 8, 8), (2, 16, 4, 4)),
        ((2, 64), (2, 32)),
        ((2, 17, 8), (2, 16, 2, 2)),
        ((2, 8, 4, 4), (2, 5, 12)),
    ],
)
def test_gradients_reach_connector_parameters(src, dst):
    conn = connect(src, dst)
    x = torch.randn(4, *src[1:], requires_grad=True)
    out = conn(x)
    (out * torch.randn_like(out)).sum().backward()  # random projection: every parameter matters
    params = list(conn.parameters())
    assert params
    for p in params:
        assert p.grad is not None and p.grad.abs().sum() > 0
    assert x.grad is not None and x.grad.abs().sum() > 0
