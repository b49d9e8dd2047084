"""Runs on disk: resolving a profile with overrides, the cache key, and train-once caching."""

import json
from dataclasses import replace as replace_spec

import pytest
import torch

from ddpm_core.checkpoint import load_checkpoint
from ddpm_core.config import replace
from ddpm_core.data import make_dataset
from ddpm_core.runs import resolve_notebook, resolve_run, run_dir, trained_checkpoint
from ddpm_core.training import Trainer
from fake_data import write_fake_mnist


@pytest.fixture(scope="module")
def mnist_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    write_fake_mnist(root, n=48)
    return root


def test_overrides_apply_and_none_keeps_the_profile():
    spec = resolve_run("laptop", schedule="cosine", attention=False, base_channels=64, lr=5e-4, steps=None)
    assert spec.diffusion.schedule == "cosine" and not spec.model.attention and spec.model.base_channels == 64
    assert spec.train.lr == 5e-4 and spec.train.steps == resolve_run("laptop").train.steps
    assert spec.dataset == "mnist"


def test_the_key_follows_what_changes_the_weights():
    spec = resolve_run("smoke")
    assert spec.key == resolve_run("smoke").key
    assert spec.key != resolve_run("smoke", lr=2e-3).key
    assert spec.key != resolve_run("smoke", schedule="cosine").key
    assert spec.key == resolve_run("smoke", log_every=1, checkpoint_every=3, snapshot_every=2).key  # watching only
    assert run_dir(spec, "some/root").parent.as_posix() == "some/root"
    # a field added after runs were cached names them only away from its default: the laptop
    # profile with t drawn by loss; with t uniform, round six's key; and at the default ramp 10
    # too, the key rounds four and five trained under
    laptop = resolve_run("laptop")
    assert run_dir(laptop, "runs").name == "laptop-mnist-02f6db404e9a"
    uniform_t = replace_spec(laptop, train=replace(laptop.train, timestep_sampling="uniform"))
    assert uniform_t.key == "336029a93cc5"
    assert replace_spec(uniform_t, train=replace(uniform_t.train, ema_ramp=10.0)).key == "4e6f1eef8e28"


@pytest.mark.parametrize("kwargs, message", [
    (dict(profile="nope"), "valid choices: smoke, laptop, mnist-gpu, cifar10-paper"),
    (dict(profile="laptop", dataset="imagenet"), "valid choices: mnist, cifar10, folder"),
    (dict(profile="laptop", dataset="cifar10"), "profiles for cifar10: cifar10-paper"),
    (dict(profile="laptop", schedule="quadratic"), "valid choices: linear, cosine"),
    (dict(profile="laptop", steps=-5), "steps must be at least 1"),
])
def test_bad_parameters_name_the_fix(kwargs, message):
    with pytest.raises(ValueError, match=message):
        resolve_run(**kwargs)


def test_auto_picks_the_device_then_the_profile():
    spec, device = resolve_notebook("auto", "mnist", "linear", True, "cpu")
    assert device.type == "cpu" and spec.profile == "laptop"
    with pytest.raises(ValueError, match="valid choices: auto, cpu, cuda, mps"):
        resolve_notebook("auto", "mnist", "linear", True, "tpu")


def test_a_configuration_is_trained_once_and_an_interrupted_run_is_completed(mnist_root, tmp_path):
    spec = resolve_run("smoke", steps=10, sample_every=0)
    folder = run_dir(spec, tmp_path)
    # an interrupted run: the same configuration stopped after 5 of its 10 steps
    Trainer(spec.model, spec.diffusion, replace(spec.train, steps=5), make_dataset("mnist", mnist_root),
            folder).run()
    path = trained_checkpoint(spec, mnist_root, root=tmp_path)
    assert path == folder / "last.pt" and load_checkpoint(path).metadata["step"] == 10
    log_lines = (folder / "log.jsonl").read_text()
    weights = load_checkpoint(path).model_state
    assert trained_checkpoint(spec, mnist_root, root=tmp_path) == path  # cached: nothing retrained
    assert (folder / "log.jsonl").read_text() == log_lines
    assert all(torch.equal(weights[k], v) for k, v in load_checkpoint(path).model_state.items())
    straight = trained_checkpoint(replace_spec(spec, profile="smoke-again"), mnist_root, root=tmp_path)
    again = load_checkpoint(straight).model_state  # the same settings without the interruption
    assert all(torch.equal(weights[k], v) for k, v in again.items())
    assert json.loads(log_lines.splitlines()[-1])["step"] == 10
