#!/usr/bin/env python3
"""Makes the PyTorch-file fixtures spin's tests read (tests never run Python): the timm state dict
of tests/fixtures/convmixer_small.safetensors written by the real `torch.save` in the nestings and
dtypes checkpoints come in, plus files spin must refuse.

    python3 -m pip install torch safetensors
    python3 scripts/make_torch_fixtures.py      # writes tests/fixtures/torch/*
"""
import os
import zipfile

import torch
from safetensors.torch import load_file

HERE = os.path.dirname(__file__)
FIXTURES = os.path.join(HERE, "..", "tests", "fixtures")
OUT = os.path.join(FIXTURES, "torch")


def main():
    os.makedirs(OUT, exist_ok=True)
    sd = load_file(os.path.join(FIXTURES, "convmixer_small.safetensors"))
    # timm's BatchNorms keep an integer step counter: spin must skip it.
    for k in [k for k in sd if k.endswith(".running_mean")]:
        sd[k.replace("running_mean", "num_batches_tracked")] = torch.tensor(3, dtype=torch.int64)

    def save(name, obj, **kw):
        torch.save(obj, os.path.join(OUT, name), **kw)

    save("top.pth", sd)
    # SlowFast / ml-spin: a .pyth with the weights under model_state beside training state.
    save("slowfast.pyth", {"epoch": 300, "model_state": sd, "optimizer_state": {"state": {}, "lr": 0.1},
                           "cfg": "MODEL: {ARCH: convmixer}"})
    save("state_dict.pt", {"state_dict": sd, "state_dict_ema": {k: v * 0 for k, v in sd.items()}, "epoch": 3})
    save("model.bin", {"model": sd, "args": {"arch": "convmixer"}})
    save("model_ema.pth", {"model_ema": sd})
    for dtype, name in [(torch.float16, "f16"), (torch.bfloat16, "bf16"), (torch.float64, "f64")]:
        save(f"{name}.pth", {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in sd.items()})
    save("legacy.pth", sd, _use_new_zipfile_serialization=False)

    # Refused: a quantized tensor, a truncated archive, an archive without a pickle, another model.
    q = torch.quantize_per_tensor(torch.ones(4), 0.1, 0, torch.qint8)
    save("quantized.pth", {"stem.0.weight": q})
    with open(os.path.join(OUT, "top.pth"), "rb") as f:
        data = f.read()
    with open(os.path.join(OUT, "truncated.pth"), "wb") as f:
        f.write(data[: len(data) // 2])
    with zipfile.ZipFile(os.path.join(OUT, "no_pickle.pth"), "w") as z:
        z.writestr("archive/version", "3\n")
    vit = load_file(os.path.join(FIXTURES, "vit_small.safetensors"))
    save("other_model.pth", vit)
    print("torch", torch.__version__, "->", sorted(os.listdir(OUT)))


if __name__ == "__main__":
    main()
