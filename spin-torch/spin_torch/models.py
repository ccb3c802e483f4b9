"""spin members on timm's own model classes, with the parameters spin shares tied.

A plan (what ``spin zoo --format json`` lists and every spin checkpoint carries) names the family,
its sizes, the schedule and what a group shares. The model is timm's ``ConvMixer`` or
``VisionTransformer`` built with those sizes; then, for every layer i, the shared parts of its
block are replaced by the module of the first layer of its group, so each shared tensor is one
``nn.Parameter``: ``model.parameters()`` yields it once, DDP/FSDP reduce it once, the optimiser
steps it once, while ``state_dict()`` still lists it under every layer's timm key (a plain timm
checkpoint).
"""

from __future__ import annotations

import torch
from torch import nn
from timm.models.convmixer import ConvMixer
from timm.models.vision_transformer import VisionTransformer

# What each granularity shares, as (block attribute paths) per family.
CONVMIXER_SHARES = {
    "none": [],
    "pointwise": ["pw"],
    "depthwise": ["dw"],
    "both": ["dw", "pw"],
    "block": ["dw", "pw", "bn1", "bn2"],
}
VIT_SHARES = {
    "none": [],
    "attn": ["attn"],
    "mlp": ["mlp"],
    "attn_mlp": ["attn", "mlp"],
    "all": ["attn", "mlp", "norm1", "norm2"],
    "fips": [],
}


class SpinConvMixer(ConvMixer):
    """SPIN's ConvMixer block: a residual around the pointwise part as well,
    ``x = x + BN(act(dw(x)))``, then ``x = x + BN2(act(pw(x)))``."""

    def forward_features(self, x):
        x = self.stem(x)
        for block in self.blocks:
            x = block[0](x)
            x = x + block[3](block[2](block[1](x)))
        return x


def _convmixer_part(block: nn.Sequential, part: str) -> tuple[nn.Module, str]:
    """The module that holds ``part`` of a timm ConvMixer block, and its attribute name there."""
    return {
        "dw": (block[0].fn, "0"),
        "bn1": (block[0].fn, "2"),
        "pw": (block, "1"),
        "bn2": (block, "3"),
    }[part]


class FipsBases(nn.Module):
    """Every group's basis U ``(groups, dim, rank)``, stored once, and the group of each block."""

    def __init__(self, groups: list[list[int]], dim: int, rank: int, depth: int):
        super().__init__()
        self.bases = nn.Parameter(torch.empty(len(groups), dim, rank))
        group_of = torch.zeros(depth)
        for g, blocks in enumerate(groups):
            for b in blocks:
                group_of[b] = g
        self.register_buffer("block_group", group_of)
        nn.init.trunc_normal_(self.bases, std=0.02)


class FipsFactor(nn.Module):
    """One MLP matrix as ``U·(v ⊙ mask)``: the sparse factor ``v (rank, hidden)``, its 0/1 mask
    (a buffer: pruned entries stay zero and get no gradient), and the layer's bias."""

    def __init__(self, rank: int, hidden: int, out: int):
        super().__init__()
        self.v = nn.Parameter(torch.empty(rank, hidden))
        self.register_buffer("mask", torch.ones(rank, hidden))
        self.bias = nn.Parameter(torch.zeros(out))
        nn.init.trunc_normal_(self.v, std=0.02)


class FipsMlp(nn.Module):
    """A block's MLP as FiPS stores it: fc1's weight is ``(U·(v1 ⊙ m1))ᵀ``, fc2's ``U·(v2 ⊙ m2)``,
    U being the basis of the block's group."""

    def __init__(self, shared: FipsBases, layer: int, rank: int, dim: int, hidden: int):
        super().__init__()
        # A plain attribute, not a submodule: the bases are registered once, on the model.
        object.__setattr__(self, "shared", shared)
        self.layer = layer
        self.fc1 = FipsFactor(rank, hidden, hidden)
        self.fc2 = FipsFactor(rank, hidden, dim)

    def forward(self, x):
        u = self.shared.bases[int(self.shared.block_group[self.layer])]
        w1 = u @ (self.fc1.v * self.fc1.mask)  # (dim, hidden)
        w2 = u @ (self.fc2.v * self.fc2.mask)  # (dim, hidden)
        h = nn.functional.gelu(x @ w1 + self.fc1.bias)
        return h @ w2.t() + self.fc2.bias


def _kept(total: int, sparsity: float) -> int:
    """Entries kept out of ``total`` at ``sparsity``, rounded as spin-rules' ``fips::kept``."""
    return int((1.0 - sparsity) * total + 0.5)


def _magnitude_masks(model: nn.Module, fips: dict) -> None:
    """Global magnitude masks per group, keeping exactly the entries the plan's sparsity allows
    (what a freshly built FiPS member holds before a checkpoint is loaded)."""
    for blocks in fips["groups"]:
        factors = [f for b in blocks for f in (model.blocks[b].mlp.fc1, model.blocks[b].mlp.fc2)]
        values = torch.cat([f.v.detach().abs().flatten() for f in factors])
        keep = _kept(values.numel(), fips["sparsity"])
        order = torch.argsort(values, descending=True, stable=True)
        flat = torch.zeros_like(values)
        flat[order[:keep]] = 1.0
        at = 0
        for f in factors:
            n = f.v.numel()
            f.mask.copy_(flat[at : at + n].view_as(f.mask))
            with torch.no_grad():
                f.v.mul_(f.mask)
            at += n


def _first_of_group(schedule: list[int]) -> dict[int, int]:
    first: dict[int, int] = {}
    for layer, g in enumerate(schedule):
        first.setdefault(g, layer)
    return first


def build(plan: dict) -> nn.Module:
    """The timm model a plan describes, shared parameters tied, in training mode."""
    family = plan["family"]
    if family == "convmixer":
        cls = SpinConvMixer if plan["variant"] == "spin" else ConvMixer
        act = {"gelu": nn.GELU, "relu": nn.ReLU}[plan["act"]]
        model = cls(
            dim=plan["dim"],
            depth=plan["depth"],
            kernel_size=plan["kernel"],
            patch_size=plan["patch"],
            num_classes=plan["classes"],
            act_layer=act,
        )
        parts = CONVMIXER_SHARES[plan["share"]]
        first = _first_of_group(plan["schedule"])
        for layer, g in enumerate(plan["schedule"]):
            src = first[g]
            if src == layer:
                continue
            for part in parts:
                holder, name = _convmixer_part(model.blocks[layer], part)
                owner, _ = _convmixer_part(model.blocks[src], part)
                setattr(holder, name, getattr(owner, name))
    elif family == "vit":
        model = VisionTransformer(
            img_size=plan["image"],
            patch_size=plan["patch"],
            num_classes=plan["classes"],
            embed_dim=plan["dim"],
            depth=plan["depth"],
            num_heads=plan["heads"],
            mlp_ratio=plan["mlp_ratio"],
        )
        first = _first_of_group(plan["schedule"])
        for layer, g in enumerate(plan["schedule"]):
            src = first[g]
            if src == layer:
                continue
            for part in VIT_SHARES[plan["share"]]:
                setattr(model.blocks[layer], part, getattr(model.blocks[src], part))
        if plan.get("fips"):
            fips = plan["fips"]
            dim, depth = plan["dim"], plan["depth"]
            hidden = int(round(dim * plan["mlp_ratio"]))
            model.fips = FipsBases(fips["groups"], dim, fips["rank"], depth)
            for layer in range(depth):
                model.blocks[layer].mlp = FipsMlp(model.fips, layer, fips["rank"], dim, hidden)
            _magnitude_masks(model, fips)
    else:
        raise ValueError(f"unknown family `{family}` in the plan of {plan.get('name')}")
    model.spin_plan = plan
    return model


def unique_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Every trainable tensor once (``nn.Module.parameters`` already yields a tied one once)."""
    return list(model.parameters())


def count_params(model: nn.Module) -> int:
    """Unique trainable parameters, pruned FiPS entries excluded: spin's ``PARAMS``."""
    total = sum(p.numel() for p in unique_parameters(model))
    for m in model.modules():
        if isinstance(m, FipsFactor):
            total -= int((m.mask == 0).sum())
    return total


def tied_ok(model: nn.Module) -> bool:
    """Whether every layer still uses the very module of its group's first layer for each shared
    part (DDP, optimiser steps and checkpoint loads must not untie them)."""
    plan = model.spin_plan
    first = _first_of_group(plan["schedule"])
    for layer, g in enumerate(plan["schedule"]):
        src = first[g]
        if plan["family"] == "convmixer":
            for part in CONVMIXER_SHARES[plan["share"]]:
                a, na = _convmixer_part(model.blocks[layer], part)
                b, nb = _convmixer_part(model.blocks[src], part)
                if getattr(a, na) is not getattr(b, nb):
                    return False
        else:
            for part in VIT_SHARES[plan["share"]]:
                if getattr(model.blocks[layer], part) is not getattr(model.blocks[src], part):
                    return False
    return True

