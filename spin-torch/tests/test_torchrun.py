"""A real two-process run: torchrun with gloo on the CPU trains a shared digits member; the ranks
end with identical parameters, tied ones still one object, the loss falls, and spin evaluates the
result with the accuracy PyTorch computes on the same images."""

import json
import os
import subprocess
import sys

import torch
from safetensors.torch import load_file

import spin_torch

NAME = "digits_vit_64_6_ws2_sequential"


def test_two_process_ddp_round_trip(spin, tmp_path):
    out = tmp_path / "run"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    def torchrun(*extra):
        return subprocess.run(
            [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
             "-m", "spin_torch.train", "--model", NAME, "--data", "digits", "--epochs", "4", "--batch", "32",
             "--out", str(out), *extra],
            capture_output=True, text=True, env=env, timeout=600,
        )

    # Three epochs, then the fourth in a resumed session.
    done = torchrun("--stop-after", "3")
    assert done.returncode == 0, done.stderr[-3000:]
    first = json.loads((out / "summary.json").read_text())["train_losses"]
    done = torchrun("--resume")
    assert done.returncode == 0, done.stderr[-3000:]
    assert len((out / "metrics.csv").read_text().strip().splitlines()) == 1 + 4
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2
    assert summary["ranks_identical"] and summary["tied"]
    losses = first + summary["train_losses"]
    assert len(losses) == 4 and losses[-1] < losses[0], losses
    assert summary["unique_parameters"] == spin_torch.plan(NAME)["params"]

    report = spin("eval", "--model", NAME, "--weights", str(out / "checkpoint.safetensors"),
                  "--dump-logits", str(out / "dump.safetensors"))
    spin_accuracy = float(report.split("test accuracy ")[1].split()[0].rstrip(","))
    dump = load_file(out / "dump.safetensors")
    model = spin_torch.create_model(None, checkpoint=out / "checkpoint.safetensors").eval()
    with torch.no_grad():
        torch_accuracy = float((model(dump["images"]).argmax(1) == dump["labels"].long()).float().mean())
    assert abs(spin_accuracy - torch_accuracy) < 1e-4, (spin_accuracy, torch_accuracy)

    # Resuming with other settings is refused.
    done = subprocess.run(
        [sys.executable, "-m", "spin_torch.train", "--model", NAME, "--epochs", "5", "--batch", "32",
         "--out", str(out), "--resume"],
        capture_output=True, text=True, env=env, timeout=600,
    )
    assert done.returncode != 0 and "other settings" in done.stderr, done.stderr[-2000:]
