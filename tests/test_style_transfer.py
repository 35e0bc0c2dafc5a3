"""Style transfers for style-augmented distillation (kdkit.refiners.style_transfer)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from kdkit.errors import KdkitError
from kdkit.refiners.style_transfer import (
    AdaINStyle,
    FourierStyle,
    StyleDecoder,
    StyleEncoder,
    adain,
    encoder_channels,
    fda_band_halfwidth,
    fda_mix,
    feature_stats,
    interpolate_alpha,
    load_style_model,
    save_style_model,
    train_style_autoencoder,
)

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


def smooth_images(count: int, size: int, seed: int = 0) -> torch.Tensor:
    """Structured images in [0.2, 0.8]: a colour gradient plus a Gaussian blob, float [N,3,S,S]."""
    g = torch.Generator().manual_seed(seed)
    t = torch.linspace(0, 1, size)
    yy, xx = torch.meshgrid(t, t, indexing="ij")
    out = []
    for _ in range(count):
        a, b, c = torch.rand(3, 3, 1, 1, generator=g)
        cy, cx, r = torch.rand(3, generator=g)
        blob = torch.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (0.02 + 0.05 * r))
        out.append(0.2 + 0.6 * (0.4 * a + 0.3 * (b * xx + (1 - b) * yy) + 0.3 * c * blob))
    return torch.stack(out)


# --- Fourier -------------------------------------------------------------------------------------


def test_band_halfwidth_reading():
    assert fda_band_halfwidth(32, 32, 0.0) == -1  # no band at all
    assert fda_band_halfwidth(32, 32, 0.01) == 0  # DC only
    assert fda_band_halfwidth(24, 40, 0.1) == 2  # floor(0.1 * min(24, 40))
    assert fda_band_halfwidth(64, 48, 0.5) == 24


def test_fourier_identities_alpha0_and_beta0():
    x, y = smooth_images(2, 32), smooth_images(2, 32, seed=1)
    out = FourierStyle(beta=0.2)(x, y, torch.zeros(2))
    torch.testing.assert_close(out, x, atol=1e-5, rtol=0)
    assert torch.equal(FourierStyle(beta=0.0)(x, y, torch.ones(2)), x)


def test_fourier_dc_only_band_shifts_mean_colour_by_hand():
    # 32 x 32 with beta 0.01: half-width 0, the band is the DC term alone, so
    # x' = x + alpha * (mean(y) - mean(x)) per channel.
    x, y = smooth_images(2, 32), smooth_images(2, 32, seed=3)
    alpha = torch.tensor([1.0, 0.25])
    out = FourierStyle()(x, y, alpha)
    shift = alpha.view(2, 1, 1, 1) * (y.mean((2, 3), keepdim=True) - x.mean((2, 3), keepdim=True))
    assert 0 < (x + shift).min() and (x + shift).max() < 1  # clamping inactive
    torch.testing.assert_close(out, x + shift, atol=1e-5, rtol=0)


def test_fourier_full_band_alpha1_gives_style_amplitudes_and_mean():
    x, y = smooth_images(2, 32), smooth_images(2, 32, seed=5)
    out = fda_mix(x, y, torch.ones(2), beta=0.5)  # half-width 16 = N/2: the whole spectrum
    amp_out, amp_y = torch.fft.fft2(out).abs(), torch.fft.fft2(y).abs()
    torch.testing.assert_close(amp_out, amp_y, atol=2e-4, rtol=1e-4)
    torch.testing.assert_close(out.mean((2, 3)), y.mean((2, 3)), atol=1e-6, rtol=0)


def test_fourier_partial_band_alpha1_moves_mean_colour():
    x, y = smooth_images(3, 32), smooth_images(3, 32, seed=7)
    out = fda_mix(x, y, torch.ones(3), beta=0.1)
    torch.testing.assert_close(out.mean((2, 3)), y.mean((2, 3)), atol=1e-6, rtol=0)


def test_fourier_midpoint_amplitudes_in_band_only_non_square():
    h, w = 24, 40
    x, y = smooth_images(1, 40)[..., :h, :], smooth_images(1, 40, seed=9)[..., :h, :]
    out = fda_mix(x, y, torch.tensor([0.5]), beta=0.1)  # b = floor(2.4) = 2
    kh = torch.fft.fftfreq(h) * h
    kw = torch.fft.fftfreq(w) * w
    band = (kh.abs() <= 2.5)[:, None] & (kw.abs() <= 2.5)[None, :]
    assert int(band.sum()) == 25
    amp_x, amp_y, amp_out = (torch.fft.fft2(t).abs()[0] for t in (x, y, out))
    want = torch.where(band, 0.5 * (amp_x + amp_y), amp_x)
    torch.testing.assert_close(amp_out, want, atol=2e-4, rtol=1e-4)
    assert not torch.allclose(amp_x[:, band], amp_y[:, band], atol=1e-2)  # the test moves something


def test_fourier_per_sample_alpha_resized_style_and_dtype():
    x = smooth_images(2, 32)
    style = torch.stack([torch.full((3, 12, 20), 0.3), torch.full((3, 12, 20), 0.6)])
    out = FourierStyle()(x, style, torch.tensor([0.0, 1.0]))
    torch.testing.assert_close(out[0], x[0], atol=1e-5, rtol=0)  # alpha 0: untouched
    # constant style resized stays constant; DC-only band at alpha 1: mean colour becomes 0.6
    torch.testing.assert_close(out[1], x[1] - x[1].mean((1, 2), keepdim=True) + 0.6, atol=1e-5, rtol=0)
    half = FourierStyle()(x.half(), style, torch.tensor([0.0, 1.0]))
    assert half.dtype == torch.float16 and half.shape == x.shape
    assert not FourierStyle(0.2)(x.requires_grad_(), style, 0.5).requires_grad


def test_fourier_rejects_bad_inputs():
    with pytest.raises(KdkitError, match="beta"):
        FourierStyle(beta=-0.1)
    x = smooth_images(2, 16)
    with pytest.raises(ValueError, match="one style image per content image"):
        FourierStyle()(x, x[:1], torch.ones(2))
    with pytest.raises(ValueError, match="alpha"):
        FourierStyle()(x, x, torch.ones(3))


# --- AdaIN ---------------------------------------------------------------------------------------


def test_feature_stats_and_adain_by_hand():
    f = torch.tensor([[[[1.0, 3.0]], [[0.0, 4.0]]]])  # [1, 2, 1, 2]
    mean, std = feature_stats(f, eps=0.0)
    torch.testing.assert_close(mean.flatten(), torch.tensor([2.0, 2.0]))
    torch.testing.assert_close(std.flatten(), torch.tensor([1.0, 2.0]))  # biased: sqrt(mean sq. dev.)
    out = adain(
        f, torch.tensor([10.0, -1.0]).view(1, 2, 1, 1), torch.tensor([2.0, 0.5]).view(1, 2, 1, 1), 0.0
    )
    torch.testing.assert_close(out, torch.tensor([[[[8.0, 12.0]], [[-1.5, -0.5]]]]))
    _, std_eps = feature_stats(f, eps=3.0)
    torch.testing.assert_close(std_eps.flatten(), torch.tensor([2.0, math.sqrt(7.0)]))


def make_adain(seed: int = 0, width: int = 8, depth: int = 3) -> AdaINStyle:
    torch.manual_seed(seed)
    encoder = StyleEncoder(width, depth)
    return AdaINStyle(encoder, StyleDecoder(encoder.out_channels, width, depth))


def test_encoder_decoder_shapes():
    encoder = StyleEncoder(width=4, depth=3)
    assert encoder(torch.rand(2, 3, 32, 32)).shape == (2, 16, 8, 8)
    assert encoder_channels(encoder) == encoder.out_channels == 16
    out = StyleDecoder(16, width=4, depth=3)(torch.rand(2, 16, 8, 8))
    assert out.shape == (2, 3, 32, 32) and 0 <= out.min() and out.max() <= 1


def test_adain_alpha0_is_reconstruction_and_tradeoff_identity():
    style = make_adain()
    x, y = smooth_images(2, 32), smooth_images(2, 16, seed=2)  # style at its own size
    f_x = style.encoder(x)
    torch.testing.assert_close(style.mix_features(x, y, torch.zeros(2)), f_x, atol=1e-5, rtol=0)
    torch.testing.assert_close(style(x, y, torch.zeros(2)), style.decoder(f_x), atol=1e-5, rtol=0)
    # AdaIN is affine in the style statistics: stats interpolation = (1-a) F(x) + a AdaIN(F(x), F(y))
    a = torch.tensor([0.3, 0.8])
    full = adain(f_x, *feature_stats(style.encoder(y)))
    want = (1 - a.view(2, 1, 1, 1)) * f_x + a.view(2, 1, 1, 1) * full
    torch.testing.assert_close(style.mix_features(x, y, a), want, atol=1e-5, rtol=1e-5)
    # alpha 1: y's mean; variance std_y^2 * var_x / (var_x + eps) (the eps inside AdaIN's std_c)
    mean_y, std_y = feature_stats(style.encoder(y))
    var_x = f_x.var((2, 3), keepdim=True, correction=0)
    var_out, mean_out = torch.var_mean(
        style.mix_features(x, y, torch.ones(2)), (2, 3), keepdim=True, correction=0
    )
    torch.testing.assert_close(mean_out, mean_y, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(var_out, std_y**2 * var_x / (var_x + style.eps), atol=1e-6, rtol=1e-4)


def test_adain_output_resized_to_odd_content_size_and_stays_eval():
    style = make_adain()
    out = style(smooth_images(2, 30), smooth_images(2, 24), 0.5)
    assert out.shape == (2, 3, 30, 30) and out.dtype == torch.float32
    style.train()
    assert not style.training and not style.encoder.training


def test_adain_external_encoder_channels_inferred_and_checked():
    front = nn.Sequential(nn.Conv2d(3, 5, 3, stride=2, padding=1), nn.BatchNorm2d(5), nn.ReLU())
    assert encoder_channels(front) == 5
    assert front.training and int(front[1].num_batches_tracked) == 0  # dry run in eval, mode restored
    style = AdaINStyle(front, StyleDecoder(5, width=4, depth=2))
    assert style(smooth_images(2, 16), smooth_images(2, 16, 1), 1.0).shape == (2, 3, 16, 16)
    with pytest.raises(KdkitError, match="expects 6-channel features but the encoder gives 5"):
        AdaINStyle(front, StyleDecoder(6, width=4, depth=2))


def test_training_halves_reconstruction_loss():
    images = (smooth_images(32, 32) * 255).round().to(torch.uint8)
    style = make_adain(width=8)
    steps = []
    losses = train_style_autoencoder(
        images,
        style.encoder,
        style.decoder,
        steps=150,
        batch_size=8,
        lr=3e-3,
        generator=0,
        callback=lambda step, loss: steps.append(step),
    )
    assert len(losses) == 150 and steps == list(range(1, 151))
    first, last = losses[0], sum(losses[-10:]) / 10
    print(f"reconstruction MSE: first {first:.5f}, mean of last 10 {last:.5f}")
    assert last < 0.5 * first


def test_training_is_deterministic_and_frozen_encoder_stays():
    images = smooth_images(16, 16)
    runs = []
    for _ in range(2):
        style = make_adain(seed=4, width=4)
        runs.append(
            train_style_autoencoder(images, style.encoder, style.decoder, steps=4, batch_size=4, generator=7)
        )
    assert runs[0] == runs[1]

    front = nn.Sequential(nn.Conv2d(3, 6, 3, stride=2, padding=1), nn.BatchNorm2d(6), nn.ReLU())
    decoder = StyleDecoder(6, width=4, depth=2)
    before_f = {k: v.clone() for k, v in front.state_dict().items()}
    before_g = {k: v.clone() for k, v in decoder.state_dict().items()}
    batches = [images[:4], (images[4:8], torch.zeros(4))]  # an iterable of batches, re-iterated
    losses = train_style_autoencoder(batches, front, decoder, steps=5, lr=1e-2, freeze_encoder=True)
    assert len(losses) == 5
    assert all(torch.equal(v, front.state_dict()[k]) for k, v in before_f.items())
    assert not all(torch.equal(v, decoder.state_dict()[k]) for k, v in before_g.items())
    assert front.training and decoder.training  # modes restored


def test_training_one_shot_iterator_stops_early():
    images = smooth_images(4, 16)
    style = make_adain(width=4)
    losses = train_style_autoencoder(iter([images[:2], images[2:]]), style.encoder, style.decoder, steps=10)
    assert len(losses) == 2
    with pytest.raises(KdkitError, match="no image batches"):
        train_style_autoencoder([], style.encoder, style.decoder, steps=1)


# --- save / load ---------------------------------------------------------------------------------


def test_save_load_round_trip(tmp_path):
    style = make_adain(seed=1)
    path = tmp_path / "style.safetensors"
    save_style_model(path, style.encoder, style.decoder, {"image_size": 32})
    assert path.is_file() and (tmp_path / "style.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["style.json", "style.safetensors"]
    loaded = load_style_model(path)
    x, y, a = smooth_images(2, 32), smooth_images(2, 32, 1), torch.tensor([0.2, 0.9])
    assert torch.equal(loaded(x, y, a), style(x, y, a))
    assert loaded.spec["spec"] == {"image_size": 32} and loaded.spec["encoder"] == {"width": 8, "depth": 3}


def test_save_load_external_encoder(tmp_path):
    front = nn.Sequential(nn.Conv2d(3, 5, 3, stride=2, padding=1), nn.ReLU())
    decoder = StyleDecoder(5, width=4, depth=2)
    path = tmp_path / "ext.safetensors"
    save_style_model(path, front, decoder)
    with pytest.raises(KdkitError, match="pass that encoder"):
        load_style_model(path)
    loaded = load_style_model(path, encoder=front)
    x = smooth_images(1, 16)
    assert torch.equal(loaded(x, x.flip(-1), 1.0), AdaINStyle(front, decoder)(x, x.flip(-1), 1.0))


def test_load_missing_or_corrupt_raises(tmp_path):
    path = tmp_path / "none.safetensors"
    with pytest.raises(KdkitError, match=r"none\.safetensors.*kdkit train-style"):
        load_style_model(path)
    style = make_adain(width=4)
    save_style_model(path, style.encoder, style.decoder)
    path.write_bytes(b"not safetensors")
    with pytest.raises(KdkitError, match=r"none\.safetensors.*corrupt.*kdkit train-style"):
        load_style_model(path)
    save_style_model(path, style.encoder, style.decoder)
    (tmp_path / "none.json").write_text("{ broken")
    with pytest.raises(KdkitError, match=r"none\.json.*kdkit train-style"):
        load_style_model(path)


# --- alpha ---------------------------------------------------------------------------------------


def test_interpolate_alpha():
    assert torch.equal(interpolate_alpha(0.25, 3), torch.full((3,), 0.25))
    drawn = interpolate_alpha([0.2, 0.6], 1000, torch.Generator().manual_seed(0))
    assert drawn.shape == (1000,) and 0.2 <= drawn.min() and drawn.max() <= 0.6
    assert abs(drawn.mean().item() - 0.4) < 0.02 and drawn.std() > 0.1
    again = interpolate_alpha((0.2, 0.6), 1000, torch.Generator().manual_seed(0))
    assert torch.equal(drawn, again)
    assert torch.equal(interpolate_alpha([0.5, 0.5], 2, torch.Generator()), torch.full((2,), 0.5))
    for bad in (1.5, -0.1, [0.7, 0.3], [0.0, 1.2], [0.1], "0.5", True, float("nan")):
        with pytest.raises(KdkitError, match="0 <= lo <= hi <= 1"):
            interpolate_alpha(bad, 2)
