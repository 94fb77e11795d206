"""The naive peer: load every state dict, stack, reduce, save. Memory grows with N.

    python benchmarks/naive_merge.py METHOD OUT BASE MODEL [MODEL ...]
"""

import sys
import time

import torch
from safetensors.torch import load_file, save_file


def main() -> None:
    method, out, base_path, *paths = sys.argv[1:]
    start = time.perf_counter()
    base = load_file(base_path)
    models = [load_file(p) for p in paths]  # everything in memory at once
    merged = {}
    for name, b in base.items():
        if not b.is_floating_point():
            merged[name] = b
            continue
        stacked = torch.stack([m[name] for m in models])
        if method == "linear":
            merged[name] = stacked.mean(0)
        elif method == "task_arithmetic":
            merged[name] = b + (stacked - b).mean(0)
        elif method == "ties":
            deltas = stacked - b
            k = max(1, int(0.2 * b.numel()))
            flat = deltas.reshape(len(models), -1)
            mask = torch.zeros_like(flat)
            mask.scatter_(1, flat.abs().topk(k, dim=1).indices, 1.0)
            deltas = (flat * mask).reshape_as(deltas)
            sign = torch.where(deltas.sum(0) >= 0, 1.0, -1.0)
            agree = (deltas.sign() == sign).float()
            merged[name] = b + (deltas * agree).sum(0) / agree.sum(0).clamp(min=1)
    save_file(merged, out)
    print(f"{time.perf_counter() - start:.3f}")


if __name__ == "__main__":
    main()
