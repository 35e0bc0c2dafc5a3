"""Diffusion style backend (claim 7) end to end on a tiny random Stable Diffusion pipeline built offline."""

from __future__ import annotations

import json
import string

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from kdkit.errors import KdkitError  # noqa: E402
from kdkit.refiners.diffusion import (  # noqa: E402
    DiffusionStyle,
    generate_style_sources,
    load_img2img_pipeline,
)

PROMPT = "at night, heavy rain"


pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny randomly initialised SD img2img pipeline saved as safetensors (no download)."""
    from diffusers import (
        AutoencoderKL,
        DDIMScheduler,
        StableDiffusionImg2ImgPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    root = tmp_path_factory.mktemp("tiny_sd")
    chars = list(string.ascii_lowercase + string.digits + ",.!?'-")
    tokens = ["<|startoftext|>", "<|endoftext|>", *chars, *(c + "</w>" for c in chars)]
    (root / "tok").mkdir()
    (root / "tok" / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}))
    (root / "tok" / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer.from_pretrained(root / "tok", model_max_length=32, local_files_only=True)

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        block_out_channels=(8, 16),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=16,
        attention_head_dim=2,
        norm_num_groups=4,
    )
    vae = AutoencoderKL(
        sample_size=32,
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        block_out_channels=(8, 16),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        norm_num_groups=4,
    )
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokens),
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            max_position_embeddings=32,
            bos_token_id=0,
            eos_token_id=1,
            pad_token_id=1,
        )
    )
    scheduler = DDIMScheduler(
        beta_schedule="scaled_linear",
        beta_start=0.00085,
        beta_end=0.012,
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )
    pipeline = StableDiffusionImg2ImgPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipeline.save_pretrained(root / "pipe", safe_serialization=True)
    return root / "pipe"


@pytest.fixture(scope="module")
def pipeline(model_dir):
    return load_img2img_pipeline(model_dir)


@pytest.fixture()
def content():
    return torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def styled(pipeline, content, alpha=(1.0, 1.0), **kwargs):
    kwargs = {"prompt": PROMPT, "strength": 1.0, "steps": 2, **kwargs}
    return DiffusionStyle(pipeline, **kwargs)(content, None, torch.tensor(alpha))


def test_loads_from_folder_without_pickles(model_dir, pipeline):
    from kdkit.refiners.style_transfer import StyleTransfer

    assert isinstance(DiffusionStyle(pipeline, PROMPT), StyleTransfer)
    assert not list(model_dir.rglob("*.bin")) and list(model_dir.rglob("*.safetensors"))
    assert type(pipeline).__name__ == "StableDiffusionImg2ImgPipeline"
    assert pipeline.safety_checker is None
    assert pipeline.device == torch.device("cpu")


def test_diffusion_style_end_to_end(model_dir, pipeline, content):
    out = DiffusionStyle(model_dir, PROMPT, strength=1.0, steps=2)(content, None, torch.ones(2))
    assert out.shape == content.shape and out.dtype == content.dtype
    assert 0.0 <= out.min() and out.max() <= 1.0
    assert not torch.allclose(out, content, atol=1e-3)

    same = styled(pipeline, content)
    assert torch.equal(out, same)
    assert not torch.allclose(styled(pipeline, content, seed=1), out, atol=1e-4)
    assert not torch.allclose(styled(pipeline, content, prompt="in winter, snow"), out, atol=1e-4)


def test_alpha_scales_strength(pipeline, content):
    assert torch.equal(styled(pipeline, content, alpha=(0.0, 0.0)), content)
    mixed = styled(pipeline, content, alpha=(0.0, 1.0))
    assert torch.equal(mixed[0], content[0])
    assert not torch.allclose(mixed[1], content[1], atol=1e-3)
    assert torch.equal(DiffusionStyle(pipeline, PROMPT, steps=2)(content, alpha=0.0), content)
    with pytest.raises(ValueError, match="alpha"):
        styled(pipeline, content, alpha=(0.5, 1.5))
    with pytest.raises(ValueError, match="content"):
        styled(pipeline, content[0], alpha=(1.0,))


def test_work_size_and_call_counter(pipeline, content):
    transfer = DiffusionStyle(pipeline, PROMPT, strength=1.0, steps=2, size=16)
    first, second = (transfer(content, None, torch.ones(2)) for _ in range(2))
    assert first.shape == content.shape and not torch.equal(first, second)


def test_generate_style_sources(pipeline, tmp_path):
    images = torch.randint(0, 256, (3, 3, 32, 32), dtype=torch.uint8)
    paths = generate_style_sources(pipeline, PROMPT, tmp_path / "night", images=images, steps=2, batch_size=2)
    assert [p.name for p in paths] == ["style_00000.png", "style_00001.png", "style_00002.png"]
    for path in paths:
        with Image.open(path) as im:
            assert im.mode == "RGB" and im.size == (32, 32)
    assert (tmp_path / "night" / "prompt.txt").read_text() == PROMPT + "\n"
    assert sorted(p.name for p in (tmp_path / "night").iterdir()) == sorted(
        [*(p.name for p in paths), "prompt.txt"]
    )

    made = generate_style_sources(pipeline, PROMPT, tmp_path / "canvas", count=1, size=(24, 32), steps=2)
    with Image.open(made[0]) as im:
        assert im.size == (32, 24) and np.asarray(im).std() > 0
    with pytest.raises(KdkitError, match="not empty"):
        generate_style_sources(pipeline, PROMPT, tmp_path / "night", images=images, steps=2)
    with pytest.raises(KdkitError, match="exactly one of images and count"):
        generate_style_sources(pipeline, PROMPT, tmp_path / "x", images=images, count=1, size=(8, 8))


def test_load_errors(tmp_path):
    with pytest.raises(KdkitError, match="does not exist.*model_index.json"):
        load_img2img_pipeline(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(KdkitError, match="empty.*no model_index.json"):
        load_img2img_pipeline(tmp_path / "empty")
    with pytest.raises(KdkitError, match="prompt"):
        DiffusionStyle(tmp_path / "missing", "")


def test_style_refiner_diffusion_method_runs_on_the_tiny_pipeline(model_dir, content):
    """The training-time path: the `style` refiner with method diffusion loads the local folder and
    appends prompt-styled copies (no style source needed); alpha 0 keeps x."""
    from kdkit.refiners import RefinerContext, StyleRefiner

    context = RefinerContext("classification", (0.5,) * 3, (0.5,) * 3, torch.device("cpu"), None, ["ce"])
    refiner = StyleRefiner(method="diffusion", model=str(model_dir), prompt="at night, heavy rain", steps=2,
                           strength=1.0, alpha=1.0)  # fmt: skip
    refiner.setup(context)
    images = content * 2 - 1  # normalised with mean 0.5, std 0.5
    out, labels = refiner(images, torch.tensor([0, 1]), torch.Generator().manual_seed(0), 2, 0)
    assert out.shape == (4, 3, 32, 32) and labels.tolist() == [0, 1, 0, 1]
    assert not torch.allclose(out[2:], images, atol=1e-3)
    refiner.alpha = 0.0
    out, _ = refiner(images, torch.tensor([0, 1]), torch.Generator().manual_seed(0), 2, 0)
    assert torch.allclose(out[2:], images, atol=1e-5)


def test_style_refiner_diffusion_noise_repeats_across_resume_and_processes(model_dir, content):
    """Noise per image comes from the step's generator and the image's global position: the same step
    run again (a resumed run) repeats x', and two processes' slices give one process's x'."""
    from kdkit.engine.batches import generator
    from kdkit.refiners import RefinerContext, StyleRefiner

    context = RefinerContext("classification", (0.5,) * 3, (0.5,) * 3, torch.device("cpu"), None, ["ce"])
    refiner = StyleRefiner(method="diffusion", model=str(model_dir), prompt=PROMPT, steps=2, strength=1.0)
    refiner.setup(context)
    images, labels = content * 2 - 1, torch.tensor([0, 1])
    whole = refiner(images, labels, generator("refine", 0, 0, 0, 5), 2, 0)[0][2:]
    again = refiner(images, labels, generator("refine", 0, 0, 0, 5), 2, 0)[0][2:]
    assert torch.equal(whole, again)
    halves = [refiner(images[i : i + 1], labels[i : i + 1], generator("refine", 0, 0, 0, 5), 2, i)[0][1:]
              for i in (0, 1)]  # fmt: skip
    torch.testing.assert_close(torch.cat(halves), whole, atol=1e-4, rtol=0)
    other_step = refiner(images, labels, generator("refine", 0, 0, 0, 6), 2, 0)[0][2:]
    assert not torch.allclose(other_step, whole, atol=1e-3)
