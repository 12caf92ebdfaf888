"""The new-process round trip every transformation is tested with: save, reload elsewhere, compare."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch
import torch.nn as nn
from safetensors.torch import save_file

_SCRIPT = """
import json, sys, torch
from safetensors.torch import load_file
import dnnprune
results = {}
for item in json.loads(sys.argv[1]):
    model = dnnprune.load(item["checkpoint"])
    data = load_file(item["io"])
    with torch.inference_mode():
        out, want = model(data["input"]), data["output"]
        # bit-identical, or within a few float32 ulps of the output's scale: some CPUs' BLAS (seen on AMD EPYC)
        # rounds a Linear differently in a new process; a wrong rebuild is off by far more than that
        ulps = 4 * torch.finfo(want.dtype).eps * max(1.0, want.abs().max().item())
        results[item["checkpoint"]] = bool(torch.equal(out, want) or (out - want).abs().max().item() <= ulps)
print(json.dumps(results))
"""


def record_io(model: nn.Module, checkpoint: Path, input_shape: tuple[int, ...], batch: int = 2) -> dict[str, str]:
    """Store a random input and the in-memory model's output beside an already saved checkpoint."""
    sample = torch.randn(batch, *input_shape)
    with torch.inference_mode():
        output = model.eval()(sample)
    io = checkpoint.with_suffix(".io.safetensors")
    save_file({"input": sample, "output": output}, str(io))
    return {"checkpoint": str(checkpoint), "io": str(io)}


def reload_in_new_process(items: list[dict[str, str]], timeout: int = 900) -> dict[str, bool]:
    """One fresh interpreter loads every checkpoint and says whether its outputs match to float rounding."""
    payload = json.dumps([{"checkpoint": i["checkpoint"], "io": i["io"]} for i in items])
    done = subprocess.run([sys.executable, "-c", _SCRIPT, payload], capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stderr[-2000:]
    results = json.loads(done.stdout.strip().splitlines()[-1])
    assert len(results) == len(items), results
    return results
