"""spin's members on PyTorch: timm's own ConvMixer and VisionTransformer with spin's sharing tied,
for training at scale with ``torch.distributed`` (``python -m spin_torch.train`` under
``torchrun``), and checkpoints that carry the member's plan back to spin.

>>> import spin_torch
>>> model = spin_torch.create_model("digits_convmixer_64_8_ws4_strided")
>>> spin_torch.count_params(model) == spin_torch.plan("digits_convmixer_64_8_ws4_strided")["params"]
True
"""

from __future__ import annotations

import json
from importlib import resources

from . import checkpoint
from .models import build, count_params, tied_ok

__all__ = ["create_model", "count_params", "plan", "plans", "tied_ok", "save", "load", "read_plan"]

save = checkpoint.save
load = checkpoint.load
read_plan = checkpoint.read_plan


def plans() -> dict[str, dict]:
    """Every zoo member's plan by name, as ``spin zoo --format json`` prints them."""
    text = resources.files(__package__).joinpath("zoo.json").read_text()
    return {p["name"]: p for p in json.loads(text)}


def plan(name: str) -> dict:
    """The plan of the zoo member ``name``; the error lists the nearest names."""
    all_plans = plans()
    if name not in all_plans:
        import difflib

        near = difflib.get_close_matches(name, list(all_plans), n=3)
        raise KeyError(f"no zoo member `{name}` (nearest: {', '.join(near)})")
    return all_plans[name]


def create_model(name_or_plan, checkpoint: str | None = None, **_timm_kwargs):
    """The member (a zoo name, or a plan dict such as a checkpoint's) as a timm model with its
    shared parameters tied; with ``checkpoint``, its weights loaded from a spin or spin-torch
    checkpoint (the plan in the file must match). ``checkpoint`` may stand alone: its plan names
    the model."""
    if name_or_plan is None and checkpoint is not None:
        p = read_plan(checkpoint)
        if p is None:
            raise ValueError(f"{checkpoint}: carries no spin plan; name the member")
    elif isinstance(name_or_plan, dict):
        p = name_or_plan
    else:
        p = plan(name_or_plan)
    model = build(p)
    if checkpoint is not None:
        load(model, checkpoint)
    return model


def _register_with_timm() -> None:
    """``timm.create_model(NAME)`` builds every member once spin_torch is imported."""
    import sys

    from timm.models import is_model, register_model

    module = sys.modules[__name__ + ".models"]
    for name in plans():
        if is_model(name):
            continue

        def factory(pretrained=False, _name=name, **kwargs):
            if pretrained:
                raise ValueError(f"{_name}: spin members have no hub weights; pass checkpoint_path")
            return create_model(_name)

        factory.__name__ = name
        factory.__qualname__ = name
        factory.__module__ = module.__name__
        setattr(module, name, factory)
        register_model(factory)


_register_with_timm()
