#!/usr/bin/env python3
"""Times spin's benchmark configurations in PyTorch/timm on the CPU and prints the ratio to spin.

    python3 -m pip install torch timm
    cargo build --release -p zoo
    python3 scripts/bench_torch.py [--threads 2] [--iters 20] [--rounds 3]

Each configuration runs in PyTorch (eval mode, float32, torch.set_num_threads) and through
`target/release/spin bench --json` in the same run, on the same machine, alternating `--rounds`
times: on a shared virtual machine both sides drift by 10-40 % within minutes, so each round's
ratio compares neighbouring measurements, and the table gives the median over rounds (the
per-round ratios are printed too). Optional: CI never runs it.
"""
import argparse
import json
import statistics
import subprocess
import time

import torch
import timm
from timm.models.convmixer import ConvMixer

CONFIGS = [
    # (spin member, batch, train, image, builder)
    ("convmixer_256_8_ks9_p2", 8, False, 32,
     lambda: ConvMixer(dim=256, depth=8, kernel_size=9, patch_size=2, num_classes=10, act_layer=torch.nn.GELU)),
    ("deit_tiny_patch16_224", 1, False, 224, lambda: timm.create_model("deit_tiny_patch16_224", pretrained=False)),
    ("convmixer_256_8_ks9_p2", 32, True, 32,
     lambda: ConvMixer(dim=256, depth=8, kernel_size=9, patch_size=2, num_classes=10, act_layer=torch.nn.GELU)),
]


def time_torch(build, batch, train, image, iters):
    model = build()
    x = torch.randn(batch, 3, image, image)
    if train:
        model.train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.05)
        y = torch.arange(batch) % 10
        loss_fn = torch.nn.CrossEntropyLoss(label_smoothing=0.1)

        def step():
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(model(x), y)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
    else:
        model.eval()

        def step():
            with torch.no_grad():
                model(x)
    for _ in range(2):
        step()
    ms = []
    for _ in range(iters):
        t = time.perf_counter()
        step()
        ms.append((time.perf_counter() - t) * 1e3)
    return statistics.median(ms), min(ms)


def time_spin(name, batch, train, iters, threads, spin):
    cmd = [spin, "bench", "--model", name, "--batch", str(batch), "--iters", str(iters),
           "--threads", str(threads), "--json"] + (["--train"] if train else [])
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--spin", default="target/release/spin")
    ap.add_argument("--rounds", type=int, default=3)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    print(f"torch {torch.__version__}, timm {timm.__version__}, {a.threads} threads, float32, "
          f"median of {a.rounds} alternating rounds")
    rows = []
    for name, batch, train, image, build in CONFIGS:
        torch_ms, spin_ms, ratios, rss = [], [], [], 0.0
        for _ in range(a.rounds):
            t_med, _ = time_torch(build, batch, train, image, a.iters)
            s = time_spin(name, batch, train, a.iters, a.threads, a.spin)
            torch_ms.append(t_med)
            spin_ms.append(s["median_ms"])
            ratios.append(s["median_ms"] / t_med)
            rss = max(rss, s["peak_rss_mb"])
        mode = "train step" if train else "forward"
        rows.append((f"{name} b{batch} {mode}", torch_ms, spin_ms, ratios, rss))
        print(f"  {name} b{batch} {mode}: ratios per round " + ", ".join(f"{r:.2f}" for r in ratios),
              flush=True)
    print("| configuration | PyTorch median ms | spin median ms | spin / PyTorch | spin peak RSS MB |")
    print("|---|---|---|---|---|")
    for label, t, s, r, rss in rows:
        med = statistics.median
        print(f"| {label} | {med(t):.1f} | {med(s):.1f} | {med(r):.2f} | {rss:.0f} |")


if __name__ == "__main__":
    main()
