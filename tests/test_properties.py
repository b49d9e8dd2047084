"""Numerical properties with a stated tolerance: bfloat16 autocast against float32 (the UNet's
forward and whole sampling runs), and the guidance gradient against finite differences."""

import copy

import torch

from conftest import TINY_UNET
from ddpm_core.classifier import NoisyClassifier
from ddpm_core.config import MNIST_SMALL_MODEL, replace
from ddpm_core.denoisers import build_model
from ddpm_core.guidance import classifier_grad
from ddpm_core.sampling import sample

BF16_EPS = 2.0**-8  # bfloat16's unit roundoff: 8 significant bits


def with_live_zero_layers(model: torch.nn.Module, std: float = 0.05) -> torch.nn.Module:
    """The model's own initialisation, except that the layers it starts at zero (each residual
    branch's last conv, the output conv) get small noise, as after some training: otherwise the
    output is exactly 0 in any precision and the comparison proves nothing."""
    with torch.no_grad():
        for p in model.parameters():
            if not p.any():
                p.normal_(0.0, std)
    return model.eval()


def relative_error(approx: torch.Tensor, exact: torch.Tensor) -> torch.Tensor:
    """||approx - exact|| / ||exact|| per sample (B,)."""
    return (approx.float() - exact).flatten(1).norm(dim=1) / exact.flatten(1).norm(dim=1)


def test_bf16_autocast_forward_is_fp32_within_a_few_roundoffs():
    # t up to 999: a timestep embedding computed in bfloat16 (999 rounds to 1000) would be far off
    model = with_live_zero_layers(build_model(MNIST_SMALL_MODEL))
    x_t, t = torch.randn(3, 1, 28, 28), torch.tensor([0, 500, 999])
    with torch.no_grad():
        exact = model(x_t, t)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            approx = model(x_t, t)
    assert approx.dtype == torch.bfloat16  # autocast reached the layers: not a float32 run compared with itself
    # measured 1.6-2.1% (~5 roundoffs, over ~20 layers); 10 roundoffs is the bound
    assert (relative_error(approx, exact) < 10 * BF16_EPS).all(), relative_error(approx, exact)


def test_amp_sampling_ends_where_fp32_sampling_ends(linear_schedule):
    # bfloat16 convolutions are slow on CPUs: 4 DDIM steps of a tiny UNet (the autocast is the
    # same code for both samplers)
    model = with_live_zero_layers(build_model(replace(TINY_UNET, attention_resolutions=())))
    exact, approx = (sample(model, linear_schedule, (4, 1, 8, 8), sampler="ddim", num_steps=4, eta=1.0, amp=amp,
                            generator=torch.Generator().manual_seed(1)).samples for amp in (False, True))
    assert approx.dtype == torch.float32  # the step arithmetic stays float32
    assert not torch.equal(approx, exact)  # amp=True did run the model in bfloat16
    # each step's eps carries ~1% error, and the steps do not amplify it (x0 clipped to [-1, 1]):
    # measured ~2% at the end; 5% is the bound
    assert (relative_error(approx, exact) < 0.05).all(), relative_error(approx, exact)


def float64(model: torch.nn.Module) -> torch.nn.Module:
    """`model` in float64; its linear layers cast their input, as the timestep embedding's
    sinusoid (a function of the integer t, not of x) arrives in float32."""
    for layer in model.modules():
        if isinstance(layer, torch.nn.Linear):
            layer.register_forward_pre_hook(lambda layer, args: tuple(a.double() for a in args))
    return model.double()


def log_prob(classifier, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """log p_phi(y | x, t) per sample (B,): log_softmax(classifier(x, t))[y]."""
    return classifier(x, t).log_softmax(dim=1)[torch.arange(len(y)), y]


def test_classifier_grad_matches_central_differences():
    classifier = with_live_zero_layers(NoisyClassifier(TINY_UNET, num_classes=10))
    exact = float64(copy.deepcopy(classifier))  # finite differences in float64: ~1e-10 error at h = 1e-5
    x_t, t, y = torch.randn(2, 1, 8, 8), torch.tensor([3, 800]), torch.tensor([1, 7])
    grad = classifier_grad(classifier, x_t, t, y)  # float32 autograd, as guided sampling uses it
    assert grad.shape == x_t.shape and grad.dtype == torch.float32
    h, generator = 1e-5, torch.Generator().manual_seed(0)
    x = x_t.double()
    with torch.no_grad():
        for _ in range(6):  # a handful of coordinates, in both samples
            i, c, row, col = (int(torch.randint(n, (1,), generator=generator)) for n in x.shape)
            step = torch.zeros_like(x)
            step[i, c, row, col] = h
            # each sample's log-probability moves with its own pixels only: the other's must not move
            difference = (log_prob(exact, x + step, t, y) - log_prob(exact, x - step, t, y)) / (2 * h)  # (B,)
            assert difference[1 - i].abs() < 1e-8
            # float32 gradients: ~1e-6 relative; 1e-3 of the gradient's largest entry is the bound
            torch.testing.assert_close(grad[i, c, row, col].double(), difference[i], rtol=1e-3,
                                       atol=1e-3 * grad[i].abs().max().item())
