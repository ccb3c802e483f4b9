"""Every zoo member builds on timm's classes with spin's sharing tied, and its unique parameter
count equals spin's PARAMS; the packaged plans are exactly what `spin zoo --format json` prints."""

import json

import pytest
import timm
import torch

import spin_torch


def test_packaged_plans_are_spins(spin):
    assert json.loads(spin("zoo", "--format", "json")) == list(spin_torch.plans().values())


@pytest.mark.parametrize("name", list(spin_torch.plans()))
def test_unique_parameters_equal_spins_params(name):
    model = spin_torch.create_model(name)
    assert spin_torch.count_params(model) == spin_torch.plan(name)["params"]
    assert spin_torch.tied_ok(model)
    assert timm.is_model(name)


def test_tied_parameters_are_one_object_and_keep_every_timm_key():
    model = spin_torch.create_model("digits_vit_64_6_ws2_sequential")  # groups [0,0,1,1,2,2]
    assert model.blocks[0].attn.qkv.weight is model.blocks[1].attn.qkv.weight
    assert model.blocks[0].norm1 is not model.blocks[1].norm1
    assert model.blocks[1].attn.qkv.weight is not model.blocks[2].attn.qkv.weight
    keys = model.state_dict().keys()
    assert all(f"blocks.{i}.mlp.fc1.weight" in keys for i in range(6))
    # The optimiser sees a tied tensor once; a step moves every layer that uses it.
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    model(torch.randn(2, 3, 8, 8)).sum().backward()
    opt.step()
    assert torch.equal(model.blocks[0].mlp.fc2.weight, model.blocks[1].mlp.fc2.weight)


def test_timm_create_model_builds_members():
    model = timm.create_model("digits_convmixer_64_8_ws4_sequential", num_classes=10)
    assert spin_torch.count_params(model) == spin_torch.plan("digits_convmixer_64_8_ws4_sequential")["params"]
    with pytest.raises(ValueError):
        timm.create_model("digits_convmixer_64_8", pretrained=True)


def test_fips_members_keep_their_sparsity():
    model = spin_torch.create_model("digits_vit_64_6_fips")
    fips = spin_torch.plan("digits_vit_64_6_fips")["fips"]
    for blocks in fips["groups"]:
        factors = [f for b in blocks for f in (model.blocks[b].mlp.fc1, model.blocks[b].mlp.fc2)]
        kept = sum(int(f.mask.sum()) for f in factors)
        total = sum(f.mask.numel() for f in factors)
        assert kept == int((1 - fips["sparsity"]) * total + 0.5)
        assert all(float((f.v.detach() * (1 - f.mask)).abs().sum()) == 0 for f in factors)


# The members timm defines itself, and the eval transform timm's pretrained config gives them.
TIMM_MEMBERS = [
    "convmixer_1536_20",
    "convmixer_768_32",
    "convmixer_1024_20_ks9_p14",
    "deit_tiny_patch16_224",
    "deit_small_patch16_224",
    "deit_base_patch16_224",
]


@pytest.mark.parametrize("name", TIMM_MEMBERS)
def test_eval_transforms_are_timms(name):
    data = spin_torch.plan(name)["data"]
    cfg = timm.get_pretrained_cfg(name).to_dict()
    assert data["crop_pct"] == pytest.approx(cfg["crop_pct"])
    assert data["interpolation"] == cfg["interpolation"]
    assert data["crop_mode"] == cfg["crop_mode"]
    assert data["size"] == cfg["input_size"][-1]
    assert data["mean"] == pytest.approx(list(cfg["mean"]))
    assert data["std"] == pytest.approx(list(cfg["std"]))


def test_spins_convmixers_resize_without_cropping():
    # ml-spin's test transform: resize to 224, centre-crop 224.
    assert spin_torch.plan("convmixer_768_32_p14_k3")["data"]["crop_pct"] == 1.0
