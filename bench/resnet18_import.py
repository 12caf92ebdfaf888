"""Benchmark: a torchvision resnet18 trained *outside* dnnprune, imported, scores the same accuracy.

Trains torchvision.models.resnet18 (1-channel stem, 10 classes) on Fashion-MNIST resized to
32x32 with plain torch + torchvision transforms, on the images of dnnprune's training split (so
dnnprune's validation split stays unseen), measures its test top-1 with that same plain
pipeline, saves `model.state_dict()` with torch.save, then runs `dnnprune import` and
`dnnprune score` and compares. Usage: python bench/resnet18_import.py [--steps N] [--out DIR]
"""

from __future__ import annotations

import argparse
import gzip
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch
import torchvision
from torchvision import transforms

FMNIST = Path("/usr/share/datasets/fashion-mnist")
MEAN, STD = 0.2860, 0.3530


def plain_datasets(root: Path) -> tuple[torch.utils.data.Dataset, torch.utils.data.Dataset]:
    raw = root / "FashionMNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for gz in FMNIST.glob("*.gz"):
        target = raw / gz.name[:-3]
        if not target.exists():
            with gzip.open(gz) as src, target.open("wb") as dst:
                shutil.copyfileobj(src, dst)
    tf = transforms.Compose([transforms.Resize(32), transforms.ToTensor(), transforms.Normalize((MEAN,), (STD,))])
    train = torchvision.datasets.FashionMNIST(str(root), train=True, transform=tf)
    test = torchvision.datasets.FashionMNIST(str(root), train=False, transform=tf)
    return train, test


def build() -> torch.nn.Module:
    model = torchvision.models.resnet18(num_classes=10)
    model.conv1 = torch.nn.Conv2d(1, 64, kernel_size=7, stride=2, padding=3, bias=False)
    return model


def dnnprune_train_indices() -> list[int]:
    """The training split dnnprune fine-tunes on (the official training set minus dnnprune's seeded,
    stratified validation split): the baseline is trained on the same images, never on validation."""
    from dnnprune.data import default_spec, load_splits

    return list(load_splits("fashion-mnist", default_spec("fashion-mnist")).train.indices)


def train_plain(model: torch.nn.Module, train: torch.utils.data.Dataset, steps: int) -> None:
    torch.manual_seed(0)
    loader = torch.utils.data.DataLoader(train, batch_size=128, shuffle=True, num_workers=0)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.05, total_steps=steps)
    model.train()
    step = 0
    while step < steps:
        for x, y in loader:
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
            sched.step()
            step += 1
            if step % 50 == 0:
                print(f"step {step}/{steps}", flush=True)
            if step >= steps:
                break


@torch.inference_mode()
def accuracy(model: torch.nn.Module, test: torch.utils.data.Dataset) -> float:
    model.eval()
    correct = total = 0
    for x, y in torch.utils.data.DataLoader(test, batch_size=500):
        correct += (model(x).argmax(1) == y).sum().item()
        total += y.numel()
    return correct / total


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--out", type=Path, default=Path("runs/bench/resnet18-import"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    train, test = plain_datasets(args.out / "plain-data")
    train = torch.utils.data.Subset(train, dnnprune_train_indices())
    model = build()
    start = time.perf_counter()
    train_plain(model, train, args.steps)
    plain_top1 = accuracy(model, test)
    weights = args.out / "resnet18.pth"
    torch.save(model.state_dict(), weights)
    ckpt = args.out / "resnet18.safetensors"
    cli = [sys.executable, "-m", "dnnprune"]
    subprocess.run(cli + ["import", str(weights), "--arch", "torchvision.resnet18", "--dataset", "fashion-mnist",
                          "--input-shape", "1,32,32", "--mean", str(MEAN), "--std", str(STD), "-o", str(ckpt), "--force"], check=True)
    report = args.out / "resnet18.score.json"
    subprocess.run(cli + ["score", str(ckpt), "--report", str(report), "--no-latency"], check=True)
    scored = json.loads(report.read_text())["metrics"]["top1"]
    result = {"steps": args.steps, "plain_top1": plain_top1, "dnnprune_top1": scored,
              "difference_points": (scored - plain_top1) * 100, "seconds": time.perf_counter() - start}
    (args.out / "result.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
