#!/usr/bin/env python3
"""Makes the eval-transform fixtures spin's tests read (tests never run Python): a few images of
the kinds users have — colour JPEG, grey PNG, non-square RGBA PNG, palette GIF, CMYK JPEG, 16-bit
grey and colour PNGs — and the tensors timm's own eval transform (PIL resize, centre crop,
ToTensor) makes of them, before normalisation, for a DeiT-style config (crop 0.9, bicubic), SPIN's
(crop 1.0) and timm's two other crop modes (squash, border).

    python3 scripts/make_transform_fixtures.py  # writes tests/fixtures/images/*
"""
import os
import struct
import zlib

import numpy as np
import torch
from PIL import Image, ImageDraw
from safetensors.torch import load_file, save_file
from timm.data import create_transform
from timm.models.vision_transformer import VisionTransformer

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


def png16(path, pixels):
    """Writes 16-bit-per-channel RGB pixels (h × w × 3, uint16) as a PNG. PIL writes 16-bit grey
    but not 16-bit colour, so the chunks are written here."""
    h, w, _ = pixels.shape
    rows = b"".join(b"\x00" + pixels[y].astype(">u2").tobytes() for y in range(h))

    def chunk(kind, data):
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    header = struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0)
    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows))
                + chunk(b"IEND", b""))


def predictions(files):
    """What a timm user's prediction gives on every file: the eval transform of a 16-px DeiT-style
    member (crop 0.9, bicubic, ImageNet statistics), then the softmax of the parity fixture ViT
    (`tests/fixtures/vit_small.safetensors`, seeded weights) — `predict/<file>`."""
    vit = VisionTransformer(img_size=16, patch_size=4, in_chans=3, num_classes=10, embed_dim=32,
                            depth=3, num_heads=4, mlp_ratio=4.0, qkv_bias=True, class_token=True,
                            global_pool="token")
    vit.load_state_dict(load_file(os.path.join(OUT, "..", "vit_small.safetensors")))
    tf = create_transform(input_size=(3, 16, 16), is_training=False, interpolation="bicubic",
                          crop_pct=0.9, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
    out = {}
    with torch.no_grad():
        for name in files:
            x = tf(Image.open(os.path.join(OUT, name)).convert("RGB"))
            out[f"predict/{name}"] = vit.eval()(x[None]).softmax(-1)[0].contiguous()
    return out


def main():
    os.makedirs(OUT, exist_ok=True)
    files = {
        "colour.jpg": photo(300, 200, 1),
        "grey.png": photo(180, 260, 2).convert("L"),
        "rgba.png": photo(97, 151, 3).convert("RGBA"),
        "palette.gif": photo(120, 90, 4).convert("P"),
        "cmyk.jpg": photo(150, 110, 5).convert("CMYK"),
        # PIL opens this as mode I;16 and its convert('RGB') clips every value above 255.
        "grey16.png": Image.fromarray((np.asarray(photo(70, 90, 6).convert("L"), np.uint16) * 3)),
    }
    for name, im in files.items():
        im.save(os.path.join(OUT, name))
    # PIL reads 16-bit colour as 8-bit, keeping each value's high byte.
    colour16 = np.asarray(photo(64, 80, 7), np.uint16) * 257 + np.arange(64, dtype=np.uint16)[None, :, None]
    png16(os.path.join(OUT, "rgb16.png"), colour16)
    files["rgb16.png"] = None
    # name: (size, crop_pct, crop_mode, interpolation, mean — the border mode's fill)
    configs = {
        "deit": (48, 0.9, "center", "bicubic", (0.0, 0.0, 0.0)),
        "spin": (40, 1.0, "center", "bicubic", (0.0, 0.0, 0.0)),
        "squash": (36, 0.875, "squash", "bilinear", (0.0, 0.0, 0.0)),
        "border": (44, 0.95, "border", "bicubic", (0.485, 0.456, 0.406)),
    }
    tensors = {}
    for cfg_name, (size, crop_pct, crop_mode, interpolation, mean) in configs.items():
        tf = create_transform(input_size=(3, size, size), is_training=False, interpolation=interpolation,
                              crop_pct=crop_pct, crop_mode=crop_mode, mean=mean, std=(1.0, 1.0, 1.0))
        for name in files:
            # As timm's datasets read a file: PIL, then convert('RGB').
            x = tf(Image.open(os.path.join(OUT, name)).convert("RGB"))
            # Undo the mean so that every tensor holds ToTensor's [0, 1] values.
            x = x + torch.tensor(mean).view(3, 1, 1)
            tensors[f"{cfg_name}/{name}"] = x.contiguous()
    tensors.update(predictions(files))
    save_file(tensors, os.path.join(OUT, "timm_eval.safetensors"))
    print(sorted(tensors), "torch", torch.__version__)


if __name__ == "__main__":
    main()
