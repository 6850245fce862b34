"""nnclr_fast.selfcheck's comparisons: a near-tie within the tolerance passes either way, a clear
winner must be found, and every returned score must be its row's."""

import torch
import torch.nn.functional as F

from nnclr_fast import selfcheck
from nnclr_fast.ops.reference import reference_nn_lookup, reference_nn_topk


def tied_inputs():
    """Query 0 scores rows 0 and 1 within 1e-6 of each other (a near-tie at every tolerance)
    and row 2 far below; query 1 has a clear winner, row 3."""
    queue = torch.tensor([[1.0, 0.0, 0.0], [1.0, 1e-3, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0], [0.0, -1.0, 0.0], [-1.0, 0.0, 0.0]])
    queue = F.normalize(queue, dim=1)
    z = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.1, 1.0]])
    return z, queue


def case(ieee=True, lookup=True):
    return selfcheck.Case(2, 6, 3, torch.float32, ieee, lookup)


def test_lookup_near_tie_passes_either_way_clear_winner_must_match():
    z, queue = tied_inputs()
    for idx in ([0, 3], [1, 3]):
        idx = torch.tensor(idx)
        assert selfcheck.compare_lookup(z, queue, queue[idx], idx, case()) is None
    idx = torch.tensor([0, 2])  # query 1's clear winner is row 3
    error = selfcheck.compare_lookup(z, queue, queue[idx], idx, case())
    assert error is not None and "query 1 chose row 2" in error
    idx = torch.tensor([2, 3])  # far below query 0's best
    assert selfcheck.compare_lookup(z, queue, queue[idx], idx, case()) is not None


def test_lookup_output_must_be_the_chosen_row():
    z, queue = tied_inputs()
    idx = torch.tensor([0, 3])
    out = queue[idx].clone()
    out[1, 0] += 1e-3
    assert "not queue[3]" in selfcheck.compare_lookup(z, queue, out, idx, case())
    bad = torch.tensor([0, 6])
    assert "outside [0, 6)" in selfcheck.compare_lookup(z, queue, queue[bad.clamp_max(5)], bad, case())


def test_lookup_with_nothing_searchable():
    z, queue = tied_inputs()
    empty = selfcheck.Case(2, 6, 3, torch.float32, True, True, valid=0)
    out, idx = reference_nn_lookup(z, queue, valid=0)
    assert selfcheck.compare_lookup(z, queue, out, idx, empty) is None
    assert selfcheck.compare_lookup(z, queue, out, torch.zeros(2, dtype=torch.int64), empty) is not None


def test_topk_accepts_the_oracle_and_rejects_wrong_ranks_and_scores():
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(6, 16, generator=gen)
    queue = F.normalize(torch.randn(300, 16, generator=gen), dim=1)
    topk = selfcheck.Case(6, 300, 16, torch.float32, True, False)
    vals, idx = reference_nn_topk(z, queue, selfcheck.TOPK)
    assert selfcheck.compare_topk(z, queue, vals, idx, topk) is None
    assert "rank 0" in selfcheck.compare_topk(z, queue, vals.flip(1), idx.flip(1), topk)
    assert "returned score" in selfcheck.compare_topk(z, queue, vals + 1e-3, idx, topk)
    dup = idx.clone()
    dup[:, 1] = dup[:, 0]
    assert "same row twice" in selfcheck.compare_topk(z, queue, vals, dup, topk)


def test_topk_near_tie_at_the_default_tolerance():
    # bfloat16 queue, default precision: rows 0 and 1 tie within 1.6e-2 for query 0.
    z, queue = tied_inputs()
    queue = queue.to(torch.bfloat16)
    topk = selfcheck.Case(2, 6, 3, torch.bfloat16, False, False)
    vals, idx = reference_nn_topk(z, queue, selfcheck.TOPK, precision="default")
    swapped_idx, swapped_vals = idx.clone(), vals.clone()
    swapped_idx[0, :2] = idx[0, :2].flip(0)
    swapped_vals[0, :2] = vals[0, :2].flip(0)
    assert selfcheck.compare_topk(z, queue, swapped_vals, swapped_idx, topk) is None


def test_cases_include_the_requested_shape_and_every_variant():
    cpu = torch.device("cpu")
    checks = selfcheck.cases(cpu, batch=512, dim=256, interpreted=True)
    assert {c.shape for c in checks} >= {"B=20 K=700 D=256", "B=9 K=301 D=40", "B=5 K=200 D=300"}
    main = [c for c in checks if c.shape == "B=20 K=700 D=256"]
    assert {(c.queue_dtype, c.ieee, c.lookup) for c in main} == {
        (d, i, lookup) for d in selfcheck.DTYPES for i in (False, True) for lookup in (False, True)
    }
    assert any(c.valid == 0 for c in checks) and any(c.normalize_queue for c in checks)
    assert any(c.strided_rows for c in checks)
    gpu_like = selfcheck.cases(torch.device("cuda"), batch=512, dim=256, interpreted=False)
    assert "B=512 K=16384 D=256" in {c.shape for c in gpu_like}


def test_strided_rows_have_no_tma_layout():
    from nnclr_fast.ops.nn_search_plan import SearchProblem

    strided = selfcheck.Case(9, 301, 40, torch.float32, False, True, strided_rows=True)
    z, queue, _ = selfcheck.make_inputs(strided, torch.device("cpu"), seed=0)
    assert not SearchProblem.of(z, queue, 1, True, False, False, False).queue_tma_layout
    plain = selfcheck.make_inputs(selfcheck.Case(9, 301, 40, torch.float32, False, True), torch.device("cpu"), seed=0)[1]
    assert torch.equal(queue, plain)
