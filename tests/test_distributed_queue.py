"""SupportQueue under torch.distributed: two CPU processes (gloo) end with identical queues."""

import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from nnclr_fast.reference import reference_enqueue

pytestmark = pytest.mark.skipif(
    not dist.is_available() or not dist.is_gloo_available(), reason="torch.distributed with gloo is not available"
)

WORLD_SIZE = 2
SIZE, DIM = 11, 6
# Per-rank batch sizes: 2 ranks x 4 rows wrap the 11-slot queue on the second step; the last
# step gathers 2 x 7 = 14 rows, more than the queue holds.
BATCHES = [4, 4, 1, 3, 7]
X_DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64, torch.float32]
TIMEOUT_S = 180


def rank_batch(rank, step):
    g = torch.Generator().manual_seed(1000 * rank + step)
    return (torch.randn(BATCHES[step], DIM, generator=g) * (rank + 1)).to(X_DTYPES[step])


def worker(rank, store_path, out_dir):
    from nnclr_fast import SupportQueue

    dist.init_process_group("gloo", init_method=f"file://{store_path}", rank=rank, world_size=WORLD_SIZE)
    try:
        queue = SupportQueue(SIZE, DIM, dtype=torch.bfloat16)
        for step in range(len(BATCHES)):
            queue.enqueue(rank_batch(rank, step))
        torch.save(queue.state_dict(), f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_ranks_hold_identical_queues(tmp_path):
    context = mp.spawn(
        worker, args=(str(tmp_path / "store"), str(tmp_path)), nprocs=WORLD_SIZE, join=False
    )
    deadline = time.monotonic() + TIMEOUT_S
    while not context.join(timeout=1):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(f"distributed workers did not finish within {TIMEOUT_S} s")

    states = [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(WORLD_SIZE)]
    for key in ("bank", "ptr", "count"):
        assert torch.equal(states[0][key], states[1][key]), key

    # The same queue a single process gets by enqueueing the gathered batches in rank order.
    expected = (torch.zeros(SIZE, DIM, dtype=torch.bfloat16), torch.tensor(0), torch.tensor(0))
    for step in range(len(BATCHES)):
        gathered = torch.cat([rank_batch(rank, step) for rank in range(WORLD_SIZE)])
        expected = reference_enqueue(*expected, gathered)
    assert int(states[0]["ptr"]) == int(expected[1]) == (2 * sum(BATCHES)) % SIZE
    assert int(states[0]["count"]) == int(expected[2]) == SIZE
    torch.testing.assert_close(states[0]["bank"], expected[0], atol=torch.finfo(torch.bfloat16).eps, rtol=0)
