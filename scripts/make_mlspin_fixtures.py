#!/usr/bin/env python3
"""Makes fixtures in ml-spin's checkpoint layout (tests never run Python): a small ConvMixer with
ml-spin's structure, key names and forward — a patch embedding `patch_embed.{conv,bn}`, blocks
with `dwise_blk` (depthwise conv, activation, BN) and `bn2`, pointwise convs held once per group
as `pwise_w.{g}` / `pwise_b.{g}` and chosen per layer by a mapping, residuals around both halves
of a block, and `head.fc` — saved as SlowFast does (`{"model_state": ..., "epoch": ...}` in a
.pyth), with its logits.

    python3 scripts/make_mlspin_fixtures.py     # writes tests/fixtures/mlspin/*

Three checkpoints: unshared (depth pointwise convs), shared with rate 2 (sequential mapping),
and a shared one made by averaging the unshared pointwise convs pairwise (weight fusion, mean),
exported with one conv per group as ml-spin's fused checkpoints hold them.
"""
import os

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import save_file

OUT = os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures", "mlspin")
DIM, DEPTH, KERNEL, PATCH, CLASSES = 16, 4, 3, 2, 5


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.dwise_blk = nn.Sequential(nn.Conv2d(DIM, DIM, KERNEL, groups=DIM, padding=KERNEL // 2),
                                       nn.GELU(), nn.BatchNorm2d(DIM))
        self.bn2 = nn.BatchNorm2d(DIM)

    def forward(self, x, w, b):
        x = x + self.dwise_blk(x)
        return x + self.bn2(F.gelu(F.conv2d(x, w, b)))


class PatchEmbed(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, DIM, PATCH, stride=PATCH)
        self.bn = nn.BatchNorm2d(DIM)

    def forward(self, x):
        return self.bn(F.gelu(self.conv(x)))


class Head(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(DIM, CLASSES)

    def forward(self, x):
        return self.fc(x.mean((2, 3)))


class MlSpinConvMixer(nn.Module):
    """ml-spin's `WSConvMixer` structure; `mapping[i]` is the pointwise conv of layer i."""

    def __init__(self, mapping):
        super().__init__()
        groups = max(mapping) + 1
        self.mapping = mapping
        self.pwise_w = nn.ParameterList([nn.Parameter(torch.randn(DIM, DIM, 1, 1) / 4) for _ in range(groups)])
        self.pwise_b = nn.ParameterList([nn.Parameter(torch.randn(DIM) / 4) for _ in range(groups)])
        self.patch_embed = PatchEmbed()
        self.blocks = nn.ModuleList([Block() for _ in range(DEPTH)])
        self.head = Head()

    def forward(self, x):
        x = self.patch_embed(x)
        for i, blk in enumerate(self.blocks):
            x = blk(x, self.pwise_w[self.mapping[i]], self.pwise_b[self.mapping[i]])
        return self.head(x)


def scramble(model, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (0.5 if p.dim() == 1 else 0.3))
            if name.endswith("weight") and p.dim() == 1:
                p.add_(1.0)
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(DIM, generator=g) * 0.2)
                m.running_var.copy_(torch.rand(DIM, generator=g) + 0.5)


def save(name, model, x):
    model.eval()
    with torch.no_grad():
        logits = model(x)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    torch.save({"epoch": 300, "model_state": state, "optimizer_state": {}}, os.path.join(OUT, f"{name}.pyth"))
    save_file({"input": x.contiguous(), "logits": logits.contiguous()}, os.path.join(OUT, f"{name}_io.safetensors"))
    print(name, sorted(k for k in state if k.startswith("pwise")), tuple(logits.shape))


def main():
    os.makedirs(OUT, exist_ok=True)
    x = torch.randn((2, 3, 16, 16), generator=torch.Generator().manual_seed(11))
    unshared = MlSpinConvMixer(list(range(DEPTH)))
    scramble(unshared, 1)
    save("unshared", unshared, x)
    shared = MlSpinConvMixer([0, 0, 1, 1])
    scramble(shared, 2)
    save("shared", shared, x)
    fused = MlSpinConvMixer([0, 0, 1, 1])
    fused.load_state_dict({k: v for k, v in unshared.state_dict().items() if not k.startswith("pwise")}, strict=False)
    with torch.no_grad():
        for g in range(2):
            fused.pwise_w[g].copy_((unshared.pwise_w[2 * g] + unshared.pwise_w[2 * g + 1]) / 2)
            fused.pwise_b[g].copy_((unshared.pwise_b[2 * g] + unshared.pwise_b[2 * g + 1]) / 2)
    save("fused", fused, x)
    print("torch", torch.__version__)


if __name__ == "__main__":
    main()
