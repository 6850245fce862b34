"""benchmarks/kernel_compile.py's SASS reader and benchmarks/kernel_report.py's model, on small
made-up inputs: hand-written SASS loops and main-loop facts (they test the reading and the
arithmetic, not any claim about a real kernel or GPU)."""

import dataclasses
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import kernel_compile as kc  # noqa: E402
import kernel_report as kr  # noqa: E402


def sass(*lines):
    """cuobjdump-like text: one instruction per line, 16 bytes apart from 0."""
    return "\n".join(f"        /*{16 * i:04x}*/                   {text} ;" for i, text in enumerate(lines))


# A wgmma main loop (0x10 to 0x80): two HGMMAs reading A from shared memory, one instruction in
# the wgmma window, a 0-deep wait, one CTA barrier.
SS_LOOP = sass(
    "MOV R1, c[0x0][0x28]",
    "WARPGROUP.ARRIVE",
    "HGMMA.64x32x16.F32.BF16 R24, gdesc[UR8], RZ, !UPT",
    "HGMMA.64x32x16.F32.BF16 R24, gdesc[UR12], R24, gsb0",
    "FMNMX R2, R24, R25, !PT",
    "WARPGROUP.DEPBAR.LE gsb0, 0x0",
    "FMNMX R3, R26, R27, !PT",
    "BAR.SYNC.DEFER_BLOCKING 0x0",
    "@P0 BRA 0x10",
    "EXIT",
)


def test_reader_counts_one_trip_of_a_wgmma_loop():
    facts = kc.sass_facts(SS_LOOP)
    loop = facts["loop"]
    assert facts["tensor_op"] == "wgmma" and facts["hgmma"] == 2 and facts["tile_extra"] is None
    assert loop["instructions"] == 8 and loop["math"] == 2
    assert loop["hgmma_a_smem"] == 2
    assert loop["hgmma_a_smem_bytes"] == 2 * 64 * 16 * 2 and loop["hgmma_b_smem_bytes"] == 2 * 32 * 16 * 2
    assert loop["wgmma_waits"] == [0] and loop["in_flight"] == 1 and loop["cta_barriers"] == 1
    assert loop["ldsm"] == 0


def test_reader_sees_a_register_operand_its_reload_and_a_deeper_wait():
    text = sass(
        "MOV R1, c[0x0][0x28]",
        "LDSM.16.M88.4 R40, [R3]",
        "WARPGROUP.ARRIVE",
        "HGMMA.64x32x16.F32.BF16 R24, R40, gdesc[UR8], R24, gsb0",
        "FMNMX R2, R24, R25, !PT",
        "FMNMX R4, R26, R27, !PT",
        "WARPGROUP.DEPBAR.LE gsb0, 0x1",
        "BRA.U !UP0, 0x10",
        "EXIT",
    )
    loop = kc.sass_facts(text)["loop"]
    assert loop["hgmma_a_smem"] == 0 and loop["hgmma_a_smem_bytes"] == 0
    assert loop["ldsm"] == 1 and loop["ldsm_bytes"] == 4 * 128
    # Depth 1: the group stays in flight over the back edge, so every other instruction of the
    # trip is issued under it.
    assert loop["wgmma_waits"] == [1] and loop["in_flight"] == 5


def test_reader_finds_a_uniform_predicate_branch_and_the_tile_loop_around_a_d_chunk_loop():
    text = sass(
        "MOV R1, c[0x0][0x28]",
        "UTMALDG.2D [UR4], [UR8]",
        "HMMA.16816.F32.BF16 R8, R4, R6, R8",
        "HMMA.16816.F32.BF16 R12, R4, R10, R12",
        "BRA.U !UP0, 0x20",
        "FMNMX R2, R8, R9, !PT",
        "BAR.SYNC.DEFER_BLOCKING 0x0",
        "@P1 BRA 0x10",
        "EXIT",
    )
    facts = kc.sass_facts(text)
    assert facts["tensor_op"] == "mma.sync" and facts["d_chunked_loop"]
    assert facts["loop"]["instructions"] == 3 and facts["loop"]["math"] == 2
    assert facts["tile_extra"]["instructions"] == 4 and facts["tile_extra"]["cta_barriers"] == 1
    assert facts["queue_loads"] == "TMA"


def loop_facts(**changes):
    loop = dict(instructions=240, math=16, math_ops=["HGMMA.64x32x16.F32.BF16"], ldsm=0, ldsm_bytes=0, lds=0,
                lds_bytes=0, sts=0, sts_bytes=0, hgmma_a_smem=16, hgmma_a_smem_bytes=16 * 64 * 16 * 2,
                hgmma_b_smem_bytes=16 * 32 * 16 * 2, wgmma_waits=[0], cta_barriers=3, utmaldg=1, ldgsts=0, ldg=0,
                setmaxreg=0, in_flight=40)
    loop.update(changes)
    return dict(loop=loop, tile_extra=None, d_chunked_loop=False, tensor_op="wgmma", hgmma=16, hmma=0,
                occupancy=1)


def plan(ctas=1):
    config = SimpleNamespace(block_b=128, block_k=32, num_warps=8, kind="mma16", d_resident=True)
    return SimpleNamespace(config=config, constexprs=(("BLOCK_D", 256),), grid=(4, 33 * ctas))


H100 = kr.GPUS[0]


def modelled(facts, the_plan, end=0):
    return kr.model(facts, the_plan, H100, "bf16", 512, 256, True, end)


def test_model_adds_what_one_cta_serialises():
    base = modelled(loop_facts(), plan())
    more_barriers = modelled(loop_facts(cta_barriers=5), plan())
    assert more_barriers["chain_clk"] - base["chain_clk"] == 2 * kr.CONST.c_bar[0]
    # The tile's shared-memory reads (A and B of two warpgroups: 96 KiB) outweigh its tensor work.
    assert base["t_smem_clk"] == 2 * (16 * 64 * 16 * 2 + 16 * 32 * 16 * 2) // 128 > base["t_tc_clk"]
    issue = 240 * 2  # instructions x warps per scheduler, 1 cycle each
    assert base["chain_clk"] == issue - 40 * 2 + base["t_smem_clk"] + 3 * 20 + 30


def test_model_overlaps_a_second_cta_and_bounds_it_by_the_shared_resources():
    one = modelled(loop_facts(), plan(1))
    two = modelled(dict(loop_facts(), occupancy=2), plan(2))
    assert two["ctas_resident"] == 2 and two["tiles_per_cta"] * 2 >= one["tiles_per_cta"]
    # Two tiles per round, bound by twice the shared-memory time, not by two chains.
    assert two["round_clk"] == 2 * two["t_smem_clk"] < 2 * one["chain_clk"]
    assert two["loop_us"] < one["loop_us"]


def test_model_high_end_is_slower_and_every_part_is_counted():
    low, high = modelled(loop_facts(), plan(), 0), modelled(loop_facts(), plan(), 1)
    assert low["total_us"] < high["total_us"]
    for r in (low, high):
        main = max(r["loop_us"], r["l2_us"], r["hbm_us"])
        assert r["total_us"] == pytest.approx(r["prologue_us"] + main + r["merge_us"], abs=0.15)


def test_constants_are_low_high_pairs():
    for field in dataclasses.fields(kr.Constants):
        low, high = getattr(kr.CONST, field.name)
        assert isinstance(low, type(high)), field.name
