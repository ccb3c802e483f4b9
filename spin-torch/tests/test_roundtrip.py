"""Checkpoints travel both ways: what spin writes loads into spin-torch and gives spin's logits
(within 1e-5 of the largest logit), what spin-torch writes loads into spin, and a plan that does
not fit is refused naming the field."""

import pytest
import timm
import torch
from safetensors.torch import load_file

import spin_torch

MEMBERS = ["digits_convmixer_64_8_ws4_strided", "digits_vit_64_6_ws2_sequential", "digits_vit_64_6_ws6_all"]


@pytest.fixture(scope="module")
def trained(spin, tmp_path_factory):
    """Each member trained one epoch by spin, and spin's logits on its test images."""
    out = {}
    for name in MEMBERS:
        d = tmp_path_factory.mktemp(name)
        spin("train", "--model", name, "--epochs", "1", "--out", str(d), "--quiet")
        spin("eval", "--model", name, "--weights", str(d / "checkpoint.safetensors"),
             "--dump-logits", str(d / "dump.safetensors"))
        out[name] = d
    return out


def logits_error(model, dump) -> float:
    with torch.no_grad():
        y = model.eval()(dump["images"])
    return float((y - dump["logits"]).abs().max() / dump["logits"].abs().max())


@pytest.mark.parametrize("name", MEMBERS)
def test_spins_checkpoints_give_spins_logits(trained, name):
    d = trained[name]
    model = spin_torch.create_model(None, checkpoint=d / "checkpoint.safetensors")
    assert model.spin_plan["name"] == name
    assert spin_torch.tied_ok(model)
    assert logits_error(model, load_file(d / "dump.safetensors")) < 1e-5


def test_spin_torch_checkpoints_load_in_spin_and_in_plain_timm(trained, spin, tmp_path):
    name = "digits_vit_64_6_ws2_sequential"
    model = spin_torch.create_model(name, checkpoint=trained[name] / "checkpoint.safetensors")
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    path = tmp_path / "torch.safetensors"
    spin_torch.save(model, path)
    spin("eval", "--model", name, "--weights", str(path), "--dump-logits", str(tmp_path / "dump.safetensors"))
    assert logits_error(model, load_file(tmp_path / "dump.safetensors")) < 1e-5
    # The same file is a plain timm checkpoint: every layer's copy is there.
    plain = timm.models.VisionTransformer(img_size=8, patch_size=2, num_classes=10, embed_dim=64, depth=6, num_heads=4)
    plain.load_state_dict(load_file(path), strict=True)


def test_a_plan_that_does_not_fit_is_refused(trained):
    strided = trained["digits_convmixer_64_8_ws4_strided"] / "checkpoint.safetensors"
    with pytest.raises(ValueError, match="schedule"):
        spin_torch.create_model("digits_convmixer_64_8_ws4_sequential", checkpoint=strided)


def test_fips_results_travel_too(spin, trained, tmp_path):
    dense = tmp_path / "dense.safetensors"
    spin_torch.save(spin_torch.create_model("digits_vit_64_6"), dense)
    fips = tmp_path / "fips.safetensors"
    spin("fips", "--from", str(dense), "--model", "digits_vit_64_6", "--calib-images", "16", "--steps", "5",
         "--rows", "32", "--out", str(fips), "--quiet")
    spin("eval", "--model", "digits_vit_64_6", "--weights", str(fips), "--dump-logits", str(tmp_path / "dump.safetensors"))
    model = spin_torch.create_model(None, checkpoint=fips)
    assert model.spin_plan["fips"]["rank"] == 109
    assert logits_error(model, load_file(tmp_path / "dump.safetensors")) < 1e-5
    again = tmp_path / "again.safetensors"
    spin_torch.save(model, again)
    assert load_file(again)["blocks.0.mlp.fc1.mask"].dtype == torch.uint8
    spin("eval", "--model", "digits_vit_64_6_fips", "--weights", str(again))
