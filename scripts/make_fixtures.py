#!/usr/bin/env python3
"""Makes the timm parity fixtures that spin's tests load (tests never run Python).

    python3 -m pip install torch timm safetensors
    python3 scripts/make_fixtures.py            # writes tests/fixtures/*.safetensors

Every weight is drawn from a seeded normal distribution (timm's default init leaves biases at zero and
norms at one, which would hide a swapped or missing term), BatchNorm running statistics come from a
few train-mode passes, and the logits come from the real timm model in eval mode, float32.
"""
import os

import timm
import torch
from safetensors.torch import save_file
from timm.models.convmixer import ConvMixer
from timm.models.vision_transformer import VisionTransformer

OUT = os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures")


def scramble(model, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            scale = 0.5 if p.dim() == 1 else 1.0 / max(1.0, (p[0].numel()) ** 0.5)
            p.copy_(torch.randn(p.shape, generator=g) * scale)
            if name.endswith("weight") and p.dim() == 1:  # norm scales around 1
                p.add_(1.0)


def warm_batchnorm(model, shape, seed):
    g = torch.Generator().manual_seed(seed)
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(shape, generator=g) * 1.5 + 0.25)
    model.eval()


def dump(name, model, x, extra=None):
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, os.path.join(OUT, f"{name}.safetensors"))
    with torch.no_grad():
        logits = model.eval()(x)
    io = {"input": x.contiguous(), "logits": logits.contiguous()}
    io.update(extra or {})
    save_file(io, os.path.join(OUT, f"{name}_io.safetensors"))
    print(f"{name}: {sum(p.numel() for p in model.parameters())} params, logits {tuple(logits.shape)}")


def main():
    os.makedirs(OUT, exist_ok=True)
    torch.manual_seed(0)

    # ConvMixer: dim 32, depth 4, kernel 5, patch 2, GELU, 16x16 inputs, 10 classes.
    cm = ConvMixer(dim=32, depth=4, kernel_size=5, patch_size=2, in_chans=3, num_classes=10,
                   act_layer=torch.nn.GELU)
    scramble(cm, 1)
    warm_batchnorm(cm, (8, 3, 16, 16), 2)
    x = torch.randn((3, 3, 16, 16), generator=torch.Generator().manual_seed(3))
    # Train-mode logits (batch statistics), from a copy so the saved running stats stay put.
    import copy
    cm_train = copy.deepcopy(cm).train()
    with torch.no_grad():
        train_logits = cm_train(x)
    dump("convmixer_small", cm, x, {"logits_train": train_logits.contiguous(),
                                    "stem_running_mean_after": cm_train.stem[2].running_mean.contiguous()})

    # Same family with ReLU and kernel 3.
    cm2 = ConvMixer(dim=24, depth=3, kernel_size=3, patch_size=4, in_chans=3, num_classes=7,
                    act_layer=torch.nn.ReLU)
    scramble(cm2, 4)
    warm_batchnorm(cm2, (8, 3, 16, 16), 5)
    x2 = torch.randn((2, 3, 16, 16), generator=torch.Generator().manual_seed(6))
    dump("convmixer_relu_small", cm2, x2)

    # ViT: dim 32, depth 3, heads 4, patch 4, 16x16 inputs, 10 classes, cls-token pooling.
    vit = VisionTransformer(img_size=16, patch_size=4, in_chans=3, num_classes=10, embed_dim=32,
                            depth=3, num_heads=4, mlp_ratio=4.0, qkv_bias=True, class_token=True,
                            global_pool="token")
    scramble(vit, 7)
    x3 = torch.randn((2, 3, 16, 16), generator=torch.Generator().manual_seed(8))
    dump("vit_small", vit.eval(), x3)
    print("timm", timm.__version__, "torch", torch.__version__)


if __name__ == "__main__":
    main()
