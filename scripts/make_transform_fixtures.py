#!/usr/bin/env python3
"""Makes the eval-transform fixtures spin's tests read (tests never run Python): a few images of
the kinds users have — colour JPEG, grey PNG, non-square RGBA PNG, palette GIF — and the tensors
timm's own eval transform (PIL resize, centre crop, ToTensor) makes of them, before
normalisation, for a DeiT-style config (crop 0.9, bicubic) and SPIN's (crop 1.0).

    python3 scripts/make_transform_fixtures.py  # writes tests/fixtures/images/*
"""
import os

import numpy as np
import torch
from PIL import Image, ImageDraw
from safetensors.torch import save_file
from timm.data import create_transform

OUT = os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures", "images")


def photo(w, h, seed):
    """Smooth gradients, hard edges and noise: what resizing filters disagree on."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    r = 127 + 120 * np.sin(x / (w / 5.0) + seed)
    g = 127 + 120 * np.cos(y / (h / 3.0))
    b = (x * y / (w * h)) * 255
    img = np.stack([r, g, b], -1) + rng.normal(0, 18, (h, w, 3))
    im = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8), "RGB")
    d = ImageDraw.Draw(im)
    d.rectangle([w // 5, h // 4, w // 2, h // 2], fill=(250, 20, 40))
    d.ellipse([w // 2, h // 3, w - 5, h - 5], outline=(0, 0, 0), width=3)
    return im


def main():
    os.makedirs(OUT, exist_ok=True)
    files = {
        "colour.jpg": photo(300, 200, 1),
        "grey.png": photo(180, 260, 2).convert("L"),
        "rgba.png": photo(97, 151, 3).convert("RGBA"),
        "palette.gif": photo(120, 90, 4).convert("P"),
    }
    for name, im in files.items():
        im.save(os.path.join(OUT, name))
    configs = {"deit": (48, 0.9), "spin": (40, 1.0)}
    tensors = {}
    for cfg_name, (size, crop_pct) in configs.items():
        tf = create_transform(input_size=(3, size, size), is_training=False, interpolation="bicubic",
                              crop_pct=crop_pct, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
        for name in files:
            # As timm's datasets read a file: PIL, then convert('RGB').
            x = tf(Image.open(os.path.join(OUT, name)).convert("RGB"))
            tensors[f"{cfg_name}/{name}"] = x.contiguous()
    save_file(tensors, os.path.join(OUT, "timm_eval.safetensors"))
    print(sorted(tensors), "torch", torch.__version__)


if __name__ == "__main__":
    main()
