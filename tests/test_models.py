"""The UNet and the baseline denoisers: parameter counts against the paper and diffusers, where
attention sits, what each output depends on (its own sample, t, y), gradients, bad configs.

The paper-sized checks build the 35.7M network on the meta device: shapes and counts without
allocating or initialising its weights."""

import math

import pytest
import torch
from diffusers import UNet2DModel

from conftest import TINY_UNET, randomize_
from ddpm_core.config import CIFAR10_PAPER_MODEL, MNIST_SMALL_MODEL, ModelConfig, replace
from ddpm_core.denoisers import ConvDenoiser, ResNetDenoiser, build_model, count_parameters, training_flops_per_image
from ddpm_core.layers import AttentionBlock, Downsample, ResnetBlock, timestep_embedding
from ddpm_core.profiles import get_profile
from ddpm_core.unet import UNet


def test_paper_cifar10_unet_has_35_7M_parameters():
    with torch.device("meta"):
        n = count_parameters(UNet(CIFAR10_PAPER_MODEL))
    assert abs(n - 35.7e6) / 35.7e6 < 0.005, n


def diffusers_unet(config: ModelConfig) -> UNet2DModel:
    """diffusers' UNet2DModel laid out as Ho et al.'s network (as in google/ddpm-cifar10-32)."""
    attn = [res in config.attention_resolutions for res in config.resolutions]
    return UNet2DModel(
        sample_size=config.image_size, in_channels=config.in_channels, out_channels=config.in_channels,
        block_out_channels=tuple(config.base_channels * m for m in config.channel_mults),
        layers_per_block=config.num_res_blocks,
        down_block_types=tuple("AttnDownBlock2D" if a else "DownBlock2D" for a in attn),
        up_block_types=tuple("AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn)),
        downsample_padding=0, flip_sin_to_cos=False, freq_shift=1, norm_eps=1e-6, attention_head_dim=None,
    )


@pytest.mark.parametrize("config", [CIFAR10_PAPER_MODEL, MNIST_SMALL_MODEL], ids=["cifar10", "mnist"])
def test_parameter_count_equals_diffusers_ddpm_layout(config):
    with torch.device("meta"):  # (the attention layers differ in form: one 1x1 qkv conv against three linears)
        assert count_parameters(UNet(config)) == count_parameters(diffusers_unet(config))


@pytest.mark.parametrize(
    "config",
    [
        MNIST_SMALL_MODEL,
        replace(MNIST_SMALL_MODEL, attention=False),
        replace(MNIST_SMALL_MODEL, attention_resolutions=(14, 7)),
        replace(TINY_UNET, in_channels=3, image_size=16, channel_mults=(1, 2, 2), attention_resolutions=(8,)),
        replace(TINY_UNET, image_size=12, attention_resolutions=(6,)),  # any size that halves often enough
    ],
    ids=["mnist", "mnist-noattn", "mnist-attn14", "rgb16", "size12"],
)
def test_each_output_depends_on_its_own_sample_only(config):
    # GroupNorm and attention work per sample: a reshape that mixed the batch into the pixels
    # (or a BatchNorm) would make a sample's output depend on the others
    model = randomize_(UNet(config)).eval()
    x = torch.randn(3, config.in_channels, config.image_size, config.image_size)
    t = torch.tensor([0, 500, 999])
    with torch.no_grad():
        out = model(x, t)
        alone = torch.cat([model(x[i : i + 1], t[i : i + 1]) for i in range(3)])
    assert out.shape == x.shape and torch.isfinite(out).all() and out.abs().max() > 0
    torch.testing.assert_close(out, alone, rtol=1e-4, atol=1e-5)  # float32, summed in another order


def test_attention_sits_at_16x16_and_in_the_middle_of_the_cifar_unet():
    with torch.device("meta"):
        model = UNet(CIFAR10_PAPER_MODEL)
        seen = []  # (H, W) of each attention layer's input, in the order they run
        for module in model.modules():
            if isinstance(module, AttentionBlock):
                module.register_forward_hook(lambda module, args, out: seen.append(tuple(args[0].shape[-2:])))
        out = model(torch.randn(1, 3, 32, 32), torch.tensor([7]))
    assert out.shape == (1, 3, 32, 32)
    # 32 -> 16 -> 8 -> 4: two down blocks at 16x16, the middle at 4x4, three up blocks at 16x16
    assert seen == [(16, 16)] * 2 + [(4, 4)] + [(16, 16)] * 3
    assert sum(isinstance(m, Downsample) for m in model.modules()) == 3


def test_attention_off_removes_every_attention_layer():
    model = UNet(replace(MNIST_SMALL_MODEL, attention=False))
    assert not any(isinstance(m, AttentionBlock) for m in model.modules())
    assert count_parameters(model) < count_parameters(UNet(MNIST_SMALL_MODEL))


@pytest.mark.parametrize("kind", ["unet", "cnn", "resnet"])
def test_gradients_reach_every_parameter(kind):
    config = replace(TINY_UNET, kind=kind, num_classes=3, dropout=0.1)
    model = randomize_(build_model(config))  # zero-initialised output layers would block gradients
    x = torch.randn(3, 1, 8, 8)
    loss = model(x, torch.tensor([0, 4, 999]), torch.tensor([0, 1, 2])).pow(2).mean()
    loss.backward()
    silent = [name for name, p in model.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert silent == [], silent


def test_zero_initialised_output_starts_at_zero():
    # the authors initialise every residual branch's last layer and the output conv to zero
    model = UNet(TINY_UNET)
    assert model(torch.randn(2, 1, 8, 8), torch.tensor([1, 2])).abs().max() == 0


# GroupNorm with one channel per group normalises each channel on its own, which removes the
# per-channel shift by which a ResNet block adds the timestep (and class) embedding. The MNIST
# profiles and the baselines run at base_channels=32, so they take 8 groups (ModelConfig), and
# one channel per group is refused.
@pytest.mark.parametrize("kind, base_channels", [
    ("unet", 32), ("unet", 64), ("cnn", 32), ("cnn", 64), ("resnet", 32), ("resnet", 64),
])
def test_timestep_changes_the_output(kind, base_channels):
    model = randomize_(build_model(replace(TINY_UNET, kind=kind, base_channels=base_channels))).eval()
    x = torch.randn(1, 1, 8, 8).repeat(2, 1, 1, 1)
    with torch.no_grad():
        out = model(x, torch.tensor([10, 900]))
    assert (out[0] - out[1]).abs().max() > 1e-4 * out.abs().max()  # more than float32 noise


@pytest.mark.parametrize("channels, groups", [(32, 8), (32, 16), (64, 32), (128, 32)])
def test_a_resnet_block_passes_its_timestep_embedding_on(channels, groups):
    block = randomize_(ResnetBlock(channels, channels, 64, dropout=0.0, groups=groups)).eval()
    x, temb_act = torch.randn(1, channels, 4, 4).repeat(2, 1, 1, 1), torch.randn(2, 64)
    with torch.no_grad():
        out = block(x, temb_act)
    assert (out[0] - out[1]).abs().max() > 1e-4 * out.abs().max()  # more than float32 noise


def test_one_channel_per_group_would_erase_the_timestep_and_is_refused():
    # what the refusal prevents: per-channel GroupNorm subtracts a per-channel shift exactly
    norm = torch.nn.GroupNorm(32, 32)
    x, shift = torch.randn(1, 32, 4, 4), torch.randn(1, 32, 1, 1)
    torch.testing.assert_close(norm(x + shift), norm(x), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="fewer than 2 channels per group.*groups <= 16"):
        ResnetBlock(32, 32, 64, dropout=0.0, groups=32)
    with pytest.raises(ValueError, match="norm_groups <= 16"):
        replace(TINY_UNET, norm_groups=32)
    with pytest.raises(ValueError, match="divide into norm_groups=12"):
        replace(TINY_UNET, norm_groups=12)
    assert ModelConfig().norm_groups == 32  # the paper's, at 128 channels and more


def test_class_conditioning_changes_the_output_and_none_means_the_null_label():
    model = randomize_(UNet(replace(TINY_UNET, num_classes=10))).eval()
    x, t = torch.randn(1, 1, 8, 8).repeat(2, 1, 1, 1), torch.tensor([5, 5])
    out = model(x, t, torch.tensor([3, 7]))
    assert not torch.allclose(out[0], out[1])
    torch.testing.assert_close(model(x, t), model(x, t, torch.tensor([10, 10])))


def test_unconditional_model_refuses_labels():
    with pytest.raises(ValueError, match="unconditional"):
        UNet(TINY_UNET)(torch.randn(1, 1, 8, 8), torch.tensor([1]), torch.tensor([2]))


def test_timestep_embedding_is_the_ddpm_sinusoid():
    t, dim = torch.tensor([0, 1, 17, 999]), 16
    emb = timestep_embedding(t, dim)
    half = dim // 2
    for i in range(half):
        freq = math.exp(-math.log(10000) * i / (half - 1))
        # float32 arguments up to ~1000 rad carry ~1e-4 absolute rounding
        torch.testing.assert_close(emb[:, i], torch.sin(t * freq).float(), rtol=0, atol=2e-4)
        torch.testing.assert_close(emb[:, half + i], torch.cos(t * freq).float(), rtol=0, atol=2e-4)
    assert timestep_embedding(t, 7).shape == (4, 7)  # odd: zero-padded
    assert (timestep_embedding(t, 7)[:, -1] == 0).all()


def test_timestep_embedding_matches_diffusers_ddpm_form():
    from diffusers.models.embeddings import get_timestep_embedding

    t = torch.arange(0, 1000, 37)
    torch.testing.assert_close(
        timestep_embedding(t, 64),
        get_timestep_embedding(t, 64, flip_sin_to_cos=False, downscale_freq_shift=1),
        rtol=0, atol=1e-4,  # float32 arguments up to ~1000 rad, rounded in a different order
    )


@pytest.mark.parametrize(("kind", "cls"), [("cnn", ConvDenoiser), ("resnet", ResNetDenoiser)])
def test_baseline_denoisers_share_the_signature_and_stay_at_full_resolution(kind, cls):
    config = replace(MNIST_SMALL_MODEL, kind=kind, num_res_blocks=3)
    model = randomize_(build_model(config)).eval()
    assert isinstance(model, cls)
    assert not any(isinstance(m, (Downsample, AttentionBlock)) for m in model.modules())
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        out = model(x, torch.tensor([1, 2]))
        alone = model(x[1:], torch.tensor([2]))
    assert out.shape == x.shape
    torch.testing.assert_close(out[1:], alone, rtol=1e-4, atol=1e-5)  # per sample, as the UNet


def test_bad_model_configs_name_the_fix():
    with pytest.raises(ValueError, match="cannot be halved"):
        ModelConfig(image_size=28, channel_mults=(1, 2, 2, 2))
    with pytest.raises(ValueError, match="valid choices: 28, 14, 7"):
        replace(MNIST_SMALL_MODEL, attention_resolutions=(16,))
    with pytest.raises(ValueError, match="valid choices: unet, cnn, resnet"):
        ModelConfig(kind="transformer")
    with pytest.raises(ValueError, match="in_channels"):
        ModelConfig(in_channels=4)
    with pytest.raises(ValueError, match=r"width \[48, 96\] must divide into norm_groups=32"):
        ModelConfig(base_channels=48)
    # attention resolutions are not checked when attention is off
    replace(MNIST_SMALL_MODEL, attention=False, attention_resolutions=(16,))


def test_wrong_input_size_is_a_clear_error():
    with pytest.raises(ValueError, match="divisible by 4"):
        UNet(MNIST_SMALL_MODEL)(torch.randn(1, 1, 30, 30), torch.tensor([1]))


def test_training_flops_are_forward_and_backward_counted_by_hand():
    # cnn, one conv: per image 2 * H * W * C_in * C_out * 9 per 3x3 conv, 2 * in * out per
    # linear; backward takes that twice (weight and input gradients) except for the input
    # gradients of the layers that read x_t and the sinusoid, which nothing needs.
    config = replace(TINY_UNET, kind="cnn", base_channels=32, num_res_blocks=1)
    hw, ch = 8 * 8, 32
    convs = [2 * hw * 1 * ch * 9, 2 * hw * ch * ch * 9, 2 * hw * ch * 1 * 9]  # in, body, out
    linears = [2 * ch * 4 * ch, 2 * 4 * ch * 4 * ch, 2 * 4 * ch * ch]  # temb 1, temb 2, projection
    forward = sum(convs) + sum(linears)
    assert training_flops_per_image(config) == 3 * forward - convs[0] - linears[0]


def test_the_laptop_profile_keeps_to_its_training_compute():
    # 129 TFLOP: the budget of the profile it replaced (1,800 x 64 images at 1.12 GFLOP each)
    laptop = get_profile("laptop")
    tflop = training_flops_per_image(laptop.model) * laptop.train.batch_size * laptop.train.steps / 1e12
    assert tflop <= 129.05
