"""A small driver for compute-sanitizer: nn_lookup, nn_topk (k=5) and SupportQueue.enqueue at
small sizes, every code path the GPU build has, each result checked against the oracle.

    compute-sanitizer --tool memcheck  python benchmarks/gpu_sanitize.py
    compute-sanitizer --tool racecheck python benchmarks/gpu_sanitize.py --quick
    python benchmarks/gpu_sanitize.py --device cpu      # the same calls on the CPU path

Sizes are small because the sanitizers slow every kernel by orders of magnitude; the Triton
configs are chosen by rule (not autotuned), so no call here benchmarks anything. Exits non-zero
if a result disagrees with ``nnclr_fast.ops.reference``.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch
import torch.nn.functional as F


def _check(name: str, ok: bool, failures: list[str]) -> None:
    print(f"  {'ok  ' if ok else 'FAIL'} {name}", flush=True)
    if not ok:
        failures.append(name)


def _close_scores(queue, z, idx, normalize_queue, atol=2e-2):
    """The chosen rows score within ``atol`` of the exact best (TF32/bf16 may pick a near-tie)."""
    zn = F.normalize(z.double(), dim=1)
    rows = queue.double()
    if normalize_queue:
        rows = F.normalize(rows, dim=1)
    exact = zn @ rows.T
    chosen = exact.gather(1, idx.clamp_min(0).reshape(idx.shape[0], -1))
    return bool((chosen >= exact.max(dim=1, keepdim=True).values - atol).all())


def run(device: torch.device, quick: bool) -> list[str]:
    import nnclr_fast
    from nnclr_fast.ops.reference import reference_enqueue, reference_nn_lookup, reference_nn_topk

    failures: list[str] = []
    gen = torch.Generator().manual_seed(0)
    # Sizes that cover a split search (K several blocks long), a short tail block and D not a
    # multiple of the block's D; B above one block of queries.
    shapes = [(37, 1000, 64), (70, 3000, 96)] if not quick else [(37, 1000, 64)]
    dtypes = [torch.float32, torch.bfloat16, torch.float16]
    for B, K, D in shapes:
        z = torch.randn(B, D, generator=gen)
        raw = torch.randn(K, D, generator=gen) * (0.5 + torch.rand(K, 1, generator=gen))
        for dtype in dtypes:
            for normalize_queue in (False, True):
                queue = (raw if normalize_queue else F.normalize(raw, dim=1)).to(dtype)
                zd, qd = z.to(device), queue.to(device)
                for precision in ("default", "ieee"):
                    tag = f"B={B} K={K} D={D} {str(dtype)[6:]} {precision} normalize_queue={normalize_queue}"
                    out, idx = nnclr_fast.nn_lookup(
                        zd, qd, precision=precision, normalize_queue=normalize_queue, return_indices=True
                    )
                    vals, top = nnclr_fast.nn_topk(zd, qd, 5, precision=precision, normalize_queue=normalize_queue)
                    if device.type == "cuda":
                        torch.cuda.synchronize(device)
                    idx, top, vals = idx.cpu(), top.cpu(), vals.cpu()
                    _check(f"lookup {tag}", _close_scores(queue, z, idx, normalize_queue)
                           and torch.equal(out.cpu(), queue[idx].to(z.dtype)), failures)
                    ref_vals, _ = reference_nn_topk(z, queue, 5, precision=precision, normalize_queue=normalize_queue)
                    _check(f"top5 {tag}", bool(torch.allclose(vals.float(), ref_vals, atol=2e-2))
                           and _close_scores(queue, z, top[:, :1], normalize_queue), failures)
                # A tensor valid (masked on the device), below k and zero.
                for valid in (K // 3, 3, 0):
                    v = torch.tensor(valid, device=device)
                    _, idx = nnclr_fast.nn_lookup(zd, qd, valid=v, normalize_queue=normalize_queue, return_indices=True)
                    _, top = nnclr_fast.nn_topk(zd, qd, 5, valid=v, normalize_queue=normalize_queue)
                    idx, top = idx.cpu(), top.cpu()
                    ok = bool((idx < max(valid, 1)).all()) and bool((top < max(valid, 1)).all())
                    ok &= bool((top[:, min(valid, 5):] == -1).all()) and bool((top[:, : min(valid, 5)] >= 0).all())
                    ok &= bool((idx == -1).all()) if valid == 0 else bool((idx >= 0).all())
                    _check(f"valid={valid} {str(dtype)[6:]} normalize_queue={normalize_queue} B={B} K={K}", ok, failures)
        # NaN rows rank lowest but stay candidates.
        queue = F.normalize(raw, dim=1)
        queue[::7] = float("nan")
        ref_idx = reference_nn_lookup(z, queue, precision="ieee")[1]
        _, idx = nnclr_fast.nn_lookup(z.to(device), queue.to(device), precision="ieee", return_indices=True)
        _check(f"NaN rows B={B} K={K}", torch.equal(idx.cpu(), ref_idx), failures)

    # The fused enqueue: wrap-around, a batch larger than the queue, bf16 bank.
    for dtype in (torch.float32, torch.bfloat16):
        sq = nnclr_fast.SupportQueue(50, 24, dtype).to(device)
        bank, ptr, count = sq.bank.detach().cpu().clone(), torch.tensor(0), torch.tensor(0)
        for batch in (16, 30, 40, 120):
            x = torch.randn(batch, 24, generator=gen)
            sq.enqueue(x.to(device))
            bank, ptr, count = reference_enqueue(bank, ptr, count, x)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        # The op's float32 norm may round differently from F.normalize's: 1 ulp-level tolerance.
        ok = torch.allclose(sq.bank.detach().cpu().float(), bank.float(), atol=1e-6 if dtype == torch.float32 else 1e-2, rtol=0)
        ok &= int(sq.ptr) == int(ptr) and int(sq.count) == int(count)
        _check(f"enqueue {str(dtype)[6:]}", bool(ok), failures)
    return failures


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cuda (default when available) or cpu")
    parser.add_argument("--quick", action="store_true", help="one shape only (for the slower racecheck)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: nothing to sanitize", file=sys.stderr)
        return 2
    start = time.perf_counter()
    failures = run(device, args.quick)
    print(f"{len(failures)} failure(s) on {device} in {time.perf_counter() - start:.1f} s")
    for name in failures:
        print(f"  FAILED: {name}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
