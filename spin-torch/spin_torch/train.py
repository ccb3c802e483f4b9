"""Train a spin member with PyTorch's distributed engine:

    torchrun --standalone --nproc_per_node 2 -m spin_torch.train --model NAME --data digits --out DIR

One process or many (``--nproc_per_node``, ``--nnodes`` and a rendezvous): a DistributedSampler
per rank, DDP (each tied tensor is one parameter, reduced once), automatic mixed precision on GPU,
gloo on CPU. SPIN's recipe by default: AdamW, a one-cycle learning rate, label smoothing 0.1,
clipping at 1.0, and for image folders RandAugment, mixup/cutmix and random erasing — all from
timm's and torch's factories. Rank 0 writes ``DIR/checkpoint.safetensors`` (spin's format, with the
plan: ``spin eval`` loads it), ``DIR/metrics.csv`` and ``DIR/resume.pt`` every epoch; ``--resume``
continues from the last epoch.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist
from timm.data import Mixup
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.optim import create_optimizer_v2
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler

from . import checkpoint, create_model, tied_ok
from .data import load as load_data


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m spin_torch.train", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="the zoo member (spin zoo lists them)")
    p.add_argument("--data", default="digits", help="digits, cifar10:DIR, folder:DIR or imagenet:DIR")
    p.add_argument("--epochs", type=int, default=10, help="epochs (default 10)")
    p.add_argument("--batch", type=int, default=64, help="images per step on each process (default 64)")
    p.add_argument("--lr", type=float, default=2e-3, help="peak learning rate (default 2e-3)")
    p.add_argument("--weight-decay", type=float, default=0.05, help="AdamW's weight decay (default 0.05)")
    p.add_argument("--label-smoothing", type=float, default=0.1, help="(default 0.1)")
    p.add_argument("--clip", type=float, default=1.0, help="global gradient norm clip, 0 for none (default 1.0)")
    p.add_argument("--mixup", type=float, default=None, help="mixup alpha (default 0.5 for image folders, else off)")
    p.add_argument("--workers", type=int, default=2, help="data loader processes per rank (default 2)")
    p.add_argument("--seed", type=int, default=0, help="(default 0)")
    p.add_argument("--init-from", help="a spin or spin-torch checkpoint to start from")
    p.add_argument("--resume", action="store_true", help="continue the run in --out (same settings)")
    p.add_argument("--stop-after", type=int, help="stop after this many epochs of the schedule (resume later)")
    p.add_argument("--out", required=True, help="run directory")
    a = p.parse_args(argv)
    for name in ("epochs", "batch"):
        if getattr(a, name) < 1:
            p.error(f"--{name} must be at least 1")
    if not a.lr > 0:
        p.error("--lr must be above 0")
    if not 0 <= a.label_smoothing < 1:
        p.error("--label-smoothing must be in [0, 1)")
    return a


def spin_one_cycle(optimizer, lr: float, total_steps: int):
    """SPIN's one-cycle schedule through torch's OneCycleLR: linear up over 40 % of the steps,
    down to lr/20 at 80 %, then to ~0 (OneCycleLR starts at lr/20 where SPIN's starts at 0)."""
    return torch.optim.lr_scheduler.OneCycleLR(
        optimizer,
        max_lr=lr,
        total_steps=max(total_steps, 3),
        pct_start=0.4,
        anneal_strategy="linear",
        three_phase=True,
        div_factor=20.0,
        final_div_factor=1e4,
        cycle_momentum=False,
    )


def parameter_digest(model: torch.nn.Module) -> str:
    """A hash of every parameter's bytes (each tied tensor once)."""
    h = hashlib.sha256()
    for p in model.parameters():
        h.update(p.detach().cpu().float().numpy().tobytes())
    return h.hexdigest()


def main(argv=None) -> None:
    a = parse_args(argv)
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    cuda = torch.cuda.is_available()
    if distributed:
        dist.init_process_group("nccl" if cuda else "gloo")
    rank = dist.get_rank() if distributed else 0
    world = dist.get_world_size() if distributed else 1
    local = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", local) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    torch.manual_seed(a.seed)
    out = Path(a.out)

    model = create_model(a.model, checkpoint=a.init_from)
    plan = model.spin_plan
    train_set, test_set = load_data(a.data, plan, seed=a.seed)
    folder_data = a.data.split(":")[0] in ("folder", "imagenet")
    mixup_alpha = a.mixup if a.mixup is not None else (0.5 if folder_data else 0.0)
    sampler = DistributedSampler(train_set, num_replicas=world, rank=rank, seed=a.seed) if distributed else None
    loader = DataLoader(
        train_set,
        batch_size=a.batch,
        sampler=sampler,
        shuffle=sampler is None,
        num_workers=a.workers if folder_data else 0,
        drop_last=mixup_alpha > 0,
    )
    test_loader = DataLoader(test_set, batch_size=256, num_workers=a.workers if folder_data else 0)

    model.to(device)
    optimizer = create_optimizer_v2(model, opt="adamw", lr=a.lr, weight_decay=a.weight_decay)
    scheduler = spin_one_cycle(optimizer, a.lr, a.epochs * len(loader))
    scaler = torch.amp.GradScaler("cuda", enabled=cuda)
    start = 0
    resume = out / "resume.pt"
    # What the schedule was made for: a resumed run must keep it.
    settings = {"model": a.model, "epochs": a.epochs, "batch": a.batch, "lr": a.lr,
                "world_size": world, "steps_per_epoch": len(loader)}
    if a.resume and resume.exists():
        state = torch.load(resume, map_location=device, weights_only=False)
        changed = [k for k, v in settings.items() if state["settings"].get(k) != v]
        if changed:
            raise SystemExit(
                f"spin_torch.train: {out} was trained with other settings ({', '.join(changed)}: "
                f"{[state['settings'].get(k) for k in changed]}); resume with the same ones"
            )
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        start = state["epoch"]
    net = DistributedDataParallel(model, device_ids=[local] if cuda else None) if distributed else model

    mixup = Mixup(mixup_alpha=mixup_alpha, cutmix_alpha=1.0, label_smoothing=a.label_smoothing,
                  num_classes=plan["classes"]) if mixup_alpha > 0 else None
    criterion = SoftTargetCrossEntropy() if mixup else LabelSmoothingCrossEntropy(a.label_smoothing)
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        if start == 0:
            with open(out / "metrics.csv", "w", newline="") as f:
                csv.writer(f).writerow(["epoch", "lr_peak", "train_loss", "test_loss", "test_accuracy", "seconds", "images_per_s"])
    losses = []
    end = min(a.stop_after or a.epochs, a.epochs)
    if rank == 0 and start >= end:
        print(f"{out}: {start} of {a.epochs} epochs already done", flush=True)
    for epoch in range(start, end):
        if sampler is not None:
            sampler.set_epoch(epoch)
        net.train()
        t0, seen, loss_sum = time.time(), 0, 0.0
        for x, y in loader:
            x, y = x.to(device), y.to(device)
            if mixup:
                x, y = mixup(x, y)
            with torch.autocast(device.type, enabled=cuda):
                loss = criterion(net(x), y)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            if a.clip > 0:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(model.parameters(), a.clip)
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            loss_sum += float(loss) * len(x)
            seen += len(x)
        seconds = time.time() - t0
        train_loss = loss_sum / max(seen, 1)
        losses.append(train_loss)
        test_loss, test_acc = evaluate(model, test_loader, device)
        if rank == 0:
            checkpoint.save(model, out / "checkpoint.safetensors")
            tmp = out / ".resume.pt.tmp"
            torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                        "scheduler": scheduler.state_dict(), "epoch": epoch + 1, "settings": settings}, tmp)
            os.replace(tmp, resume)
            with open(out / "metrics.csv", "a", newline="") as f:
                csv.writer(f).writerow([epoch + 1, a.lr, f"{train_loss:.6f}", f"{test_loss:.6f}",
                                        f"{test_acc:.6f}", f"{seconds:.3f}", f"{seen * world / seconds:.1f}"])
            print(f"epoch {epoch + 1:>3}: train loss {train_loss:.4f} | test loss {test_loss:.4f} "
                  f"acc {test_acc:.4f} | {seconds:.1f}s, {seen * world / seconds:.0f} img/s", flush=True)

    # Every rank must hold the same parameters, and the tied ones must still be one object.
    digest = parameter_digest(model)
    digests = [None] * world
    if distributed:
        dist.all_gather_object(digests, digest)
    else:
        digests = [digest]
    if rank == 0:
        summary = {
            "model": plan["name"],
            "world_size": world,
            "ranks_identical": len(set(digests)) == 1,
            "tied": tied_ok(model),
            "train_losses": losses,
            "unique_parameters": sum(p.numel() for p in model.parameters()),
        }
        (out / "summary.json").write_text(json.dumps(summary, indent=2))
    if distributed:
        dist.barrier()
        dist.destroy_process_group()


@torch.no_grad()
def evaluate(model: torch.nn.Module, loader, device) -> tuple[float, float]:
    """Plain cross-entropy and top-1 accuracy (every rank evaluates the whole test set)."""
    model.eval()
    loss_sum, correct, n = 0.0, 0, 0
    for x, y in loader:
        x, y = x.to(device), y.to(device)
        logits = model(x).float()
        loss_sum += float(torch.nn.functional.cross_entropy(logits, y, reduction="sum"))
        correct += int((logits.argmax(1) == y).sum())
        n += len(y)
    model.train()
    return loss_sum / max(n, 1), correct / max(n, 1)


if __name__ == "__main__":
    main()
