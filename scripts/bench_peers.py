#!/usr/bin/env python3
"""spin against the runtimes a user would otherwise pick on a CPU: PyTorch eager (timm's model)
and ONNX Runtime (the same model exported with torch.onnx.export, opset 17, all graph
optimisations), in one run, on the same threads, alternating rounds.

    python3 -m pip install torch timm onnx onnxruntime   # optional: CI never runs this
    cargo build --release -p zoo
    python3 scripts/bench_peers.py [--threads 2] [--rounds 3] [--iters 20] [--cases abcdefg] [--scaling]

On a shared virtual machine every side drifts by 10-40 % within minutes, so each round times
every case in PyTorch, ONNX Runtime and spin back to back (the order rotates per round), each
round's ratio compares neighbouring measurements, and the table gives the median over rounds with
the per-round ratios. The machine's FP32 peak comes from `spin bench --peak` (a probe of
independent FMA chains, run before and after the cases; the larger counts); every case's GFLOP/s
counts 2 FLOPs per multiply-add of the forward pass (a training step as 3 forward passes).
"""
import argparse
import csv
import io
import json
import os
import statistics
import subprocess
import time
import warnings

import torch
import timm
from timm.models.convmixer import ConvMixer

try:
    import onnxruntime as ort
except ImportError:  # ONNX Runtime is optional: its column is left empty
    ort = None

try:
    import spin_torch  # registers spin's shared members with timm (case g)
except ImportError:
    spin_torch = None


def small_convmixer():
    return ConvMixer(dim=256, depth=8, kernel_size=9, patch_size=2, num_classes=10, act_layer=torch.nn.GELU)


# letter: (spin member, batch, train, image, builder)
CASES = {
    "a": ("convmixer_256_8_ks9_p2", 8, False, 32, small_convmixer),
    "b": ("convmixer_768_32", 1, False, 224, lambda: timm.create_model("convmixer_768_32")),
    "c": ("deit_tiny_patch16_224", 1, False, 224, lambda: timm.create_model("deit_tiny_patch16_224")),
    "d": ("convmixer_256_8_ks9_p2", 32, True, 32, small_convmixer),
    "e": ("deit_small_patch16_224", 8, False, 224, lambda: timm.create_model("deit_small_patch16_224")),
    "f": ("deit_tiny_patch16_224", 8, True, 224, lambda: timm.create_model("deit_tiny_patch16_224")),
    "g": ("convmixer_768_32_ws4_sequential", 1, False, 224,
          lambda: timm.create_model("convmixer_768_32_ws4_sequential")),
}


def timed(step, iters):
    for _ in range(2):
        step()
    ms = []
    for _ in range(iters):
        t = time.perf_counter()
        step()
        ms.append((time.perf_counter() - t) * 1e3)
    return statistics.median(ms)


def time_torch(build, batch, train, image, iters):
    model = build()
    x = torch.randn(batch, 3, image, image)
    if not train:
        model.eval()

        def step():
            with torch.no_grad():
                model(x)
        return timed(step, iters)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.05)
    y = torch.arange(batch) % 10
    loss_fn = torch.nn.CrossEntropyLoss(label_smoothing=0.1)

    def step():
        opt.zero_grad(set_to_none=True)
        loss_fn(model(x), y).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
    return timed(step, iters)


def onnx_session(build, batch, image, threads):
    warnings.filterwarnings("ignore")  # the exporter's tracer warnings about Python control flow
    model = build().eval()
    x = torch.randn(batch, 3, image, image)
    buf = io.BytesIO()
    torch.onnx.export(model, (x,), buf, opset_version=17, input_names=["x"], output_names=["y"], dynamo=False)
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    sess = ort.InferenceSession(buf.getvalue(), opts, providers=["CPUExecutionProvider"])
    return sess, {"x": x.numpy()}


def spin(args, exe):
    out = subprocess.run([exe] + args, check=True, capture_output=True, text=True).stdout
    return json.loads(out)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2, help="threads for every engine (at least 1)")
    ap.add_argument("--iters", type=int, default=20, help="timed iterations per round (at least 1)")
    ap.add_argument("--rounds", type=int, default=3, help="alternating rounds; the table shows medians")
    ap.add_argument("--cases", default="abcdefg",
                    help="which cases, as letters: 'ac' or 'a,c' (default: all, abcdefg)")
    ap.add_argument("--spin", default="target/release/spin", help="the spin binary to time")
    ap.add_argument("--scaling", action="store_true", help="also images/s of case b at batch 1, 8, 32")
    a = ap.parse_args()
    a.cases = a.cases.replace(",", "").replace(" ", "")
    unknown = sorted(set(a.cases) - set(CASES))
    if unknown:
        ap.error(f"unknown case(s) {', '.join(unknown)}: choose from {''.join(CASES)}")
    for flag in ("threads", "iters", "rounds"):
        if getattr(a, flag) < 1:
            ap.error(f"--{flag} must be at least 1")
    torch.set_num_threads(a.threads)
    zoo = {row["name"]: row for row in csv.DictReader(io.StringIO(subprocess.run(
        [a.spin, "zoo", "--format", "csv"], check=True, capture_output=True, text=True).stdout))}
    def probe():
        return spin(["bench", "--peak", "--threads", str(a.threads), "--json"], a.spin)["peak_gflops"]
    peak = probe()
    print(f"torch {torch.__version__}, timm {timm.__version__}, onnxruntime "
          f"{ort.__version__ if ort else 'not installed'}; {a.threads} thread{'s' * (a.threads != 1)}, float32; "
          f"FMA peak {peak:.0f} GFLOP/s; median of {a.rounds} alternating rounds; {os.uname().machine}")
    sessions = {}
    rows = []
    for letter in a.cases:
        name, batch, train, image, build = CASES[letter]
        if letter == "g" and spin_torch is None:
            print("  g: skipped (pip install ./spin-torch builds the shared member in PyTorch)")
            continue
        gflop = 2 * int(zoo[name]["macs"]) * batch * (3 if train else 1) / 1e9
        if ort and not train and letter not in sessions:
            sessions[letter] = onnx_session(build, batch, image, a.threads)
        t_ms, o_ms, s_ms, ratios, rss = [], [], [], [], 0.0
        for r in range(a.rounds):
            order = ["torch", "ort", "spin"]
            order = order[r % 3:] + order[:r % 3]
            got = {}
            for side in order:
                if side == "torch":
                    got["torch"] = time_torch(build, batch, train, image, a.iters)
                elif side == "ort" and letter in sessions:
                    sess, feed = sessions[letter]
                    got["ort"] = timed(lambda: sess.run(None, feed), a.iters)
                elif side == "spin":
                    s = spin(["bench", "--model", name, "--batch", str(batch), "--iters", str(a.iters),
                              "--threads", str(a.threads), "--json"] + (["--train"] if train else []), a.spin)
                    got["spin"] = s["median_ms"]
                    rss = max(rss, s["peak_rss_mb"])
            t_ms.append(got["torch"])
            s_ms.append(got["spin"])
            if "ort" in got:
                o_ms.append(got["ort"])
            best = min(v for k, v in got.items() if k != "spin")
            ratios.append(got["spin"] / best)
        mode = "training step" if train else "forward"
        label = f"{letter} {name} b{batch} {image}² {mode}"
        rows.append((label, t_ms, o_ms, s_ms, ratios, gflop, rss))
        print(f"  {label}: spin / best peer per round " + ", ".join(f"{x:.2f}" for x in ratios), flush=True)
    # A probe during a busy spell of a shared machine reads low; the table divides by the better
    # of the probes before and after the cases.
    again = probe()
    if abs(again - peak) > 0.1 * max(again, peak):
        print(f"  FMA peak probes differ: {peak:.0f} GFLOP/s before the cases, {again:.0f} after; "
              f"'of peak' uses {max(peak, again):.0f}")
    peak = max(peak, again)
    med = statistics.median
    print("| case | spin ms | PyTorch ms | ONNX Runtime ms | spin / best | spin GFLOP/s | of peak | spin peak RSS MB |")
    print("|---|---|---|---|---|---|---|---|")
    for label, t, o, s, r, gflop, rss in rows:
        ort_cell = f"{med(o):.1f}" if o else "–"
        rate = gflop / (med(s) / 1e3)
        print(f"| {label} | {med(s):.1f} | {med(t):.1f} | {ort_cell} | {med(r):.2f} | {rate:.0f} | "
              f"{rate / peak:.0%} | {rss:.0f} |")
    if a.scaling:
        print("\ncase b, images/s by batch (spin; PyTorch):")
        name, _, _, image, build = CASES["b"]
        for batch in (1, 8, 32):
            s = spin(["bench", "--model", name, "--batch", str(batch), "--iters", "5", "--threads",
                      str(a.threads), "--json"], a.spin)
            t = time_torch(build, batch, False, image, 5)
            print(f"  batch {batch}: spin {s['images_per_s']:.1f}, PyTorch {batch / (t / 1e3):.1f}")


if __name__ == "__main__":
    main()
