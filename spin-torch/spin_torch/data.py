"""Data sets for ``spin_torch.train``: the digits spin ships, CIFAR-10's binary batches, and image
folders (``DIR/train/<class>``, ``DIR/val/<class>``) through timm's datasets and transforms."""

from __future__ import annotations

import gzip
from importlib import resources
from pathlib import Path

import numpy as np
import torch
from timm.data import ImageDataset, create_transform, resolve_data_config
from torch.utils.data import Dataset, TensorDataset


def _normalise(x: np.ndarray, data: dict) -> torch.Tensor:
    """NCHW values in [0, 1] normalised by the plan's data config."""
    mean = np.asarray(data["mean"], dtype=np.float32)[None, :, None, None]
    std = np.asarray(data["std"], dtype=np.float32)[None, :, None, None]
    return torch.from_numpy(((x - mean) / std).astype(np.float32))


def digits(plan: dict, seed: int = 0) -> tuple[Dataset, Dataset]:
    """The UCI digits spin ships (8×8, 0..16, replicated to 3 channels, scaled to [0, 1] and
    normalised as the member's data config says), split 80/20 by a seeded permutation. spin's own
    split uses its own generator: compare the two sides on the images ``spin eval
    --dump-logits`` writes."""
    if plan["image"] != 8:
        raise ValueError(f"{plan['name']} takes {plan['image']}² images; the digits are 8×8")
    raw = resources.files(__package__).joinpath("digits.csv.gz").read_bytes()
    rows = np.loadtxt(gzip.decompress(raw).decode().splitlines(), delimiter=",", dtype=np.float32)
    pixels = rows[:, :64].reshape(-1, 1, 8, 8) / 16.0
    x = _normalise(np.repeat(pixels, 3, axis=1), plan["data"])
    y = torch.from_numpy(rows[:, 64].astype(np.int64))
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    n_test = round(len(y) * 0.2)
    test, train = order[:n_test], order[n_test:]
    return TensorDataset(x[train], y[train]), TensorDataset(x[test], y[test])


def cifar10(root: Path, plan: dict) -> tuple[Dataset, Dataset]:
    """CIFAR-10's binary batches (``data_batch_{1..5}.bin``, ``test_batch.bin``)."""

    def read(names):
        records = np.concatenate(
            [np.fromfile(root / n, dtype=np.uint8).reshape(-1, 3073) for n in names]
        )
        x = records[:, 1:].reshape(-1, 3, 32, 32).astype(np.float32) / 255.0
        return TensorDataset(_normalise(x, plan["data"]), torch.from_numpy(records[:, 0].astype(np.int64)))

    return read([f"data_batch_{i}.bin" for i in range(1, 6)]), read(["test_batch.bin"])


def folders(root: Path, plan: dict, augment: bool) -> tuple[Dataset, Dataset]:
    """An ImageFolder layout, ``root/train/<class>`` and ``root/val/<class>`` (ImageNet's as
    timm reads it), with timm's training transform (RandAugment, random erasing, … when
    ``augment``) and the member's eval transform."""
    data = plan["data"]
    config = resolve_data_config(
        {
            "input_size": (3, data["size"], data["size"]),
            "mean": tuple(data["mean"]),
            "std": tuple(data["std"]),
            "crop_pct": data["crop_pct"],
            "crop_mode": data.get("crop_mode", "center"),
            "interpolation": data["interpolation"],
        }
    )
    train_tf = create_transform(
        **config,
        is_training=True,
        auto_augment="rand-m9-mstd0.5-inc1" if augment else None,
        re_prob=0.25 if augment else 0.0,
    )
    eval_tf = create_transform(**config, is_training=False)
    for split in ("train", "val"):
        if not (root / split).is_dir():
            raise FileNotFoundError(f"{root / split}: expected an ImageFolder split (one folder per class)")
    return (
        ImageDataset(str(root / "train"), transform=train_tf),
        ImageDataset(str(root / "val"), transform=eval_tf),
    )


def load(spec: str, plan: dict, seed: int = 0, augment: bool = True) -> tuple[Dataset, Dataset]:
    """``digits``, ``cifar10:DIR``, ``folder:DIR`` or ``imagenet:DIR`` as (train, test)."""
    kind, _, path = spec.partition(":")
    if kind == "digits" and not path:
        return digits(plan, seed)
    if kind == "cifar10" and path:
        return cifar10(Path(path), plan)
    if kind in ("folder", "imagenet") and path:
        return folders(Path(path), plan, augment)
    raise ValueError(f"unknown data `{spec}`: use digits, cifar10:DIR, folder:DIR or imagenet:DIR")

