"""Checkpoints in spin's format: safetensors with timm's keys (a tied tensor under every layer's
key), FiPS factors as kept values plus bit masks, and the member's plan in the metadata under
``spin.plan`` — so ``spin`` loads them directly and timm loads the dense ones as plain models.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

PLAN_KEY = "spin.plan"


def _pack_mask(mask: torch.Tensor) -> torch.Tensor:
    """A 0/1 mask ``(rows, cols)`` as bits, ``(rows, ceil(cols / 8))`` bytes, entry ``8j + b`` of
    a row in bit b (least significant first) of byte j — spin's layout."""
    bits = np.packbits(mask.detach().cpu().numpy().astype(bool), axis=1, bitorder="little")
    return torch.from_numpy(bits.copy())


def _unpack_mask(bits: torch.Tensor, cols: int) -> torch.Tensor:
    unpacked = np.unpackbits(bits.cpu().numpy(), axis=1, bitorder="little")
    if unpacked[:, cols:].any():
        raise ValueError(f"a FiPS mask sets a bit past column {cols}")
    return torch.from_numpy(unpacked[:, :cols].astype(np.float32))


def state_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's tensors as spin stores them: every timm key (tied copies cloned, since
    safetensors refuses shared storage), FiPS's ``…fcN.v``/``…fcN.mask`` packed."""
    out = {}
    state = model.state_dict()
    for key, value in state.items():
        if key.endswith(".mask") and key[: -len(".mask")] + ".v" in state:
            continue
        if key.endswith(".v") and key[: -len(".v")] + ".mask" in state:
            mask = state[key[: -len(".v")] + ".mask"]
            out[key] = value[mask != 0].detach().float().contiguous().clone()
            out[key[: -len(".v")] + ".mask"] = _pack_mask(mask)
            continue
        if key.endswith("num_batches_tracked"):
            out[key] = value.detach().clone()
            continue
        out[key] = value.detach().float().contiguous().clone()
    return out


def save(model: torch.nn.Module, path: str | os.PathLike) -> None:
    """Writes ``model`` with its plan, atomically (temporary file in the same folder, then
    rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.cpu() for k, v in state_tensors(model).items()}
    metadata = {PLAN_KEY: json.dumps(model.spin_plan), "format": "pt"}
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=metadata)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def read_plan(path: str | os.PathLike) -> dict | None:
    """The plan a checkpoint carries, if any."""
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    return json.loads(meta[PLAN_KEY]) if PLAN_KEY in meta else None


def load(model: torch.nn.Module, path: str | os.PathLike) -> None:
    """Loads a spin (or timm) checkpoint into ``model``: every key must be present with its
    shape, FiPS factors are unpacked into their dense values and masks, a plan in the file must
    match the model's (the error names the field)."""
    plan = read_plan(path)
    if plan is not None:
        mismatch = plan_mismatch(model.spin_plan, plan)
        if mismatch:
            field, ours, theirs = mismatch
            raise ValueError(
                f"{path}: the checkpoint is {plan['name']} with {field} = {theirs}, "
                f"but {model.spin_plan['name']} has {field} = {ours}"
            )
    state = model.state_dict()
    tensors = {}
    with safe_open(str(path), framework="pt") as f:
        for key in f.keys():
            tensors[key] = f.get_tensor(key)
    loaded = {}
    for key, target in state.items():
        base = key[: -len(".v")] if key.endswith(".v") else None
        if base is not None and base + ".mask" in state:
            mask = _unpack_mask(tensors[base + ".mask"], target.shape[1])
            dense = torch.zeros_like(target)
            dense[mask != 0] = tensors[key].to(target.dtype)
            loaded[key] = dense
            loaded[base + ".mask"] = mask.to(target.dtype)
        elif key.endswith(".mask") and key[: -len(".mask")] + ".v" in state:
            continue
        elif key not in tensors:
            if key.endswith("num_batches_tracked"):
                continue
            raise KeyError(f"{path}: missing tensor `{key}`")
        else:
            loaded[key] = tensors[key].to(target.dtype)
    unexpected = [k for k in tensors if k not in state and not k.endswith("num_batches_tracked")]
    if unexpected:
        raise KeyError(f"{path}: unexpected tensor `{unexpected[0]}`; this model has no such parameter")
    for key, value in loaded.items():
        if tuple(value.shape) != tuple(state[key].shape):
            raise ValueError(f"{path}: `{key}` has shape {tuple(value.shape)}, the model expects {tuple(state[key].shape)}")
    model.load_state_dict(loaded, strict=False)


STRUCTURAL = ["family", "dim", "depth", "patch", "image", "classes", "kernel", "act", "variant",
              "heads", "mlp_ratio"]

# The block parts each granularity shares: "a" (depthwise conv / attention), "b" (pointwise conv /
# MLP), "norms" — as spin-rules' ConvMixerShare and VitShare say.
SHARED_PARTS = {
    "convmixer": {"none": set(), "pointwise": {"b"}, "depthwise": {"a"}, "both": {"a", "b"},
                  "block": {"a", "b", "norms"}},
    "vit": {"none": set(), "fips": set(), "attn": {"a"}, "mlp": {"b"}, "attn_mlp": {"a", "b"},
            "all": {"a", "b", "norms"}},
}


def _ties(plan: dict, part: str, i: int, j: int) -> bool:
    shared = SHARED_PARTS[plan["family"]].get(plan["share"], set())
    return part in shared and plan["schedule"][i] == plan["schedule"][j]


def plan_mismatch(ours: dict, theirs: dict):
    """The first field that keeps a model of plan ``ours`` from holding a checkpoint of
    ``theirs``, as ``(field, ours, theirs)``, or None — spin's ``Plan::mismatch``: sizes must
    agree; sharing may differ as long as the model ties no two layers the checkpoint keeps apart
    (a checkpoint holds every layer's copy, so an unshared model loads a shared one)."""
    for field in STRUCTURAL:
        if ours.get(field) != theirs.get(field):
            return field, ours.get(field), theirs.get(field)

    # A FiPS model's budget and sparsity describe it; its groups and rank fix its tensors.
    def fips(plan):
        f = plan.get("fips") or {}
        return f.get("groups"), f.get("rank")

    if fips(ours) != fips(theirs):
        return "fips", ours.get("fips"), theirs.get("fips")
    depth = ours["depth"]
    for part in ("a", "b", "norms"):
        for i in range(depth):
            for j in range(i + 1, depth):
                if _ties(ours, part, i, j) and not _ties(theirs, part, i, j):
                    return ("schedule", f"{ours['schedule']} ({ours['share']})",
                            f"{theirs['schedule']} ({theirs['share']})")
    return None
