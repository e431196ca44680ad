"""Benchmark: DGCNN's kNN graph on CPU: the compiled kernel, the torch path and the original code's kNN.

Torch only. For each layer of the paper's DGCNN (input channels 3, 64, 64, 128) at the training shape
(one view of a batch of 20 clouds of 2,048 points, k=15) and the evaluation shape (32 clouds of 1,024
points), it times in one process, alternating, the median of ``--repeats`` calls of:

- ``kernel``: :func:`crossmoco_ray.nn.graph.knn` with the compiled kernel (:mod:`crossmoco_ray.nn.kernels`);
- ``torch``: the same function on its fallback (a product per chunk of clouds, then ``torch.topk``);
- ``reference``: :func:`crossmoco_ray.nn.graph.knn_reference`, the original code's kNN.

and checks that the three select the same distances. Freed memory is kept for reuse, as training runs.

    python bench/knn.py
    python bench/knn.py --repeats 9 --json bench/out/knn.json
    python bench/knn.py --smoke               # tiny sizes: checks that the script runs
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CHANNELS = (3, 64, 64, 128)
SHAPES = {"train": (20, 2048, 15), "eval": (32, 1024, 15), "smoke": (2, 100, 5)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)

    import torch

    from crossmoco_ray.nn import kernels
    from crossmoco_ray.nn.graph import knn, knn_reference
    from crossmoco_ray.nn.precision import cpu_description, keep_freed_memory

    if not kernels.available():
        raise SystemExit("the compiled kNN kernel is unavailable here (see the warning above)")
    keep_freed_memory()
    max_k = kernels.max_k

    def fallback(x: torch.Tensor, k: int) -> torch.Tensor:
        kernels.max_k = lambda: 0  # type: ignore[assignment]
        try:
            return knn(x, k, ordered=False)
        finally:
            kernels.max_k = max_k

    impls = {
        "kernel": lambda x, k: knn(x, k, ordered=False),
        "torch": fallback,
        "reference": lambda x, k: knn_reference(x.transpose(1, 2), k),
    }
    shapes = {"smoke": SHAPES["smoke"]} if args.smoke else {n: s for n, s in SHAPES.items() if n != "smoke"}
    repeats = 1 if args.smoke else args.repeats
    rows = []
    for shape, (B, N, k) in shapes.items():
        for layer, C in enumerate(CHANNELS, 1):
            torch.manual_seed(layer)
            x = torch.randn(B, N, C)
            dist = None
            picked = {}
            for name, fn in impls.items():  # warm-up, and the selected distances
                idx = fn(x, k)
                if dist is None:
                    dist = -torch.cdist(x.double(), x.double()).pow(2)
                picked[name] = dist.gather(-1, idx).sort(-1).values
            assert dist is not None
            tol = 1e-4 * float(dist.abs().max())
            same = all(torch.allclose(v, picked["reference"], atol=tol) for v in picked.values())
            times: dict[str, list[float]] = {name: [] for name in impls}
            for _ in range(repeats):
                for name, fn in impls.items():
                    t0 = time.perf_counter()
                    fn(x, k)
                    times[name].append(time.perf_counter() - t0)
            med = {name: statistics.median(t) for name, t in times.items()}
            rows.append({"shape": shape, "B": B, "N": N, "k": k, "layer": layer, "C": C, "same": same, **med})
            del dist, picked

    print(f"\ntorch {torch.__version__}, {torch.get_num_threads()} threads, {cpu_description()}; "
          f"median of {repeats}\n")  # fmt: skip
    print("| shape | layer (C) | reference ms | torch path ms | kernel ms | kernel vs torch path "
          "| kernel vs reference | same distances |")  # fmt: skip
    print("|---|---|---:|---:|---:|---:|---:|---|")
    for r in rows:
        print(f"| {r['shape']} {r['B']}x{r['N']} k={r['k']} | {r['layer']} ({r['C']}) "
              f"| {r['reference'] * 1e3:.1f} | {r['torch'] * 1e3:.1f} | {r['kernel'] * 1e3:.1f} "
              f"| x{r['torch'] / r['kernel']:.2f} | x{r['reference'] / r['kernel']:.2f} "
              f"| {r['same']} |")  # fmt: skip
    for shape in shapes:
        sel = [r for r in rows if r["shape"] == shape]
        ref, tor, ker = (sum(r[n] for r in sel) for n in ("reference", "torch", "kernel"))
        print(f"| {shape}: all four layers | | {ref * 1e3:.1f} | {tor * 1e3:.1f} | {ker * 1e3:.1f} "
              f"| x{tor / ker:.2f} | x{ref / ker:.2f} | |")  # fmt: skip
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(rows, indent=2))
    if not all(r["same"] for r in rows):
        raise SystemExit("the implementations selected different distances")


if __name__ == "__main__":
    main()
