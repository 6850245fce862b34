"""Launch plans (nnclr_fast.ops.nn_search_plan) as the pure function they are: no compile, no GPU.

What the compiler makes of each plan is tests/ops/test_nn_search_triton.py's; here, the rules:
every plan fits its device by the shared-memory estimate with the margin to spare, TMA only
where the backend has it, no TF32 request from a 16-bit dot, a fallback with a reason that
names the device and the fix wherever the fused kernel is not planned.
"""

import dataclasses
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from nnclr_fast.ops import nn_search_plan as plans
from nnclr_fast.ops.nn_search_plan import (
    ARCH_FAMILY,
    CANDIDATES,
    INTERPRETER,
    MAX_KERNEL_TOPK,
    SMEM_MARGIN,
    DeviceSpec,
    SearchProblem,
    plan_search,
    smem_estimate,
)

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import kernel_compile  # noqa: E402  (the reference devices and the matrix the compile test uses)

DEVICES = kernel_compile.reference_devices()
PLANNED = [d for d in DEVICES if d.arch in ARCH_FAMILY]
DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def problems(dims=(1, 8, 64, 100, 128, 200, 256, 257, 384, 512, 1000, 2048), batches=(1, 32, 64, 65, 512, 4096)):
    for q in DTYPES:
        for z in (torch.float32, q):
            for ieee in (False, True):
                for dim in dims:
                    for batch in batches:
                        for k, lookup in ((1, True), (5, False), (16, False)):
                            yield SearchProblem(batch, dim, 98_304, z, q, ieee, k, lookup, has_valid=True)


def test_reference_devices_cover_the_listed_architectures():
    listed = {"sm_75", "sm_80", "sm_86", "sm_89", "sm_90a", "sm_100a", "sm_120", "gfx942", "gfx90a"}
    assert listed <= {d.arch for d in DEVICES}
    assert set(ARCH_FAMILY) <= {d.arch for d in DEVICES}, "every planned architecture is in the compile matrix"


@pytest.mark.parametrize("device", PLANNED, ids=lambda d: d.arch)
def test_every_plan_fits_with_the_margin(device):
    family = ARCH_FAMILY[device.arch]
    for problem in problems():
        plan = plan_search(problem, device)
        assert plan.fused, (problem, plan.fallback)
        need = smem_estimate(plan.config, problem, device)
        assert need + SMEM_MARGIN <= device.smem_per_block, (problem, plan.config.name, need)
        assert plan.config.ctas_per_sm * (need + 1024) <= device.smem_per_block + 1024
        assert plan.config in CANDIDATES[family][plan.config.kind]
        assert plan.config.applies_to(problem)


@pytest.mark.parametrize("smem_kib", [99, 163, 227])
@pytest.mark.parametrize("arch", ["sm_80", "sm_86", "sm_89", "sm_90a", "sm_100a", "sm_120"])
def test_any_cuda_part_of_a_planned_arch_fits_or_falls_back_by_name(arch, smem_kib):
    # The estimate decides, not the architecture's usual part: a 99 KiB sm_90a-like device too.
    device = DeviceSpec("cuda", arch, 100, smem_kib << 10, "Some GPU")
    for problem in problems(dims=(64, 256, 512), batches=(32, 512)):
        plan = plan_search(problem, device)
        if plan.fused:
            assert smem_estimate(plan.config, problem, device) + SMEM_MARGIN <= device.smem_per_block
        else:
            assert plan.fallback.startswith(f"Some GPU ({arch}): no config of the fused kernel fits D={problem.dim}")


def test_too_little_shared_memory_falls_back_naming_device_and_fix():
    device = DeviceSpec("cuda", "sm_80", 108, 20 << 10, "Tiny GPU")
    plan = plan_search(SearchProblem(512, 256, 1000, torch.float32, torch.float32, False), device)
    assert not plan.fused and plan.config is None
    assert "Tiny GPU (sm_80)" in plan.fallback and "20 KiB" in plan.fallback and "Fix:" in plan.fallback


@pytest.mark.parametrize("device", DEVICES, ids=lambda d: d.arch)
def test_tma_only_on_cuda_sm90_and_newer(device):
    for problem in problems(dims=(64, 256, 512), batches=(32, 512)):
        plan = plan_search(problem, device)
        if plan.fused:
            assert plan.use_tma == (device.backend == "cuda" and device.capability >= (9, 0))
    unaligned = SearchProblem(64, 256, 1000, torch.bfloat16, torch.bfloat16, False, queue_tma_layout=False)
    assert not plan_search(unaligned, device).use_tma


def device_spec_from(monkeypatch, props, hip_version):
    """DeviceSpec.of(cuda:0) as torch would describe a device with these properties."""
    monkeypatch.setattr(torch.version, "hip", hip_version)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index: props)
    plans._device_spec.cache_clear()
    try:
        return DeviceSpec.of(torch.device("cuda", 0))
    finally:
        plans._device_spec.cache_clear()


def test_rocm_capability_is_never_read_as_hopper(monkeypatch):
    # A ROCm build of torch reports gfx942 as "cuda" with capability (9, 4).
    props = SimpleNamespace(gcnArchName="gfx942:sramecc+:xnack-", major=9, minor=4, multi_processor_count=304,
                            shared_memory_per_block_optin=65_536, shared_memory_per_block=65_536, name="AMD Instinct MI300X")
    device = device_spec_from(monkeypatch, props, "6.4.0")
    assert device == DeviceSpec("hip", "gfx942", 304, 65_536, "AMD Instinct MI300X")
    assert device.capability is None
    plan = plan_search(SearchProblem(512, 256, 98_304, torch.float32, torch.bfloat16, False), device)
    assert plan.fused and not plan.use_tma


def test_cuda_device_spec_from_properties(monkeypatch):
    props = SimpleNamespace(major=9, minor=0, multi_processor_count=132, shared_memory_per_block_optin=232_448,
                            shared_memory_per_block=49_152, name="NVIDIA H100 80GB HBM3")
    device = device_spec_from(monkeypatch, props, None)
    assert device == DeviceSpec("cuda", "sm_90a", 132, 232_448, "NVIDIA H100 80GB HBM3")
    assert device.capability == (9, 0)


@pytest.mark.parametrize("device", DEVICES + (INTERPRETER,), ids=lambda d: d.arch)
def test_a_16_bit_dot_never_asks_for_tf32(device):
    for problem in problems(dims=(64, 512), batches=(512,)):
        plan = plan_search(problem, device)
        if not plan.fused:
            continue
        precision = dict(plan.constexprs)["DOT_PRECISION"]
        if problem.queue_dtype != torch.float32 or problem.ieee:
            assert precision == "ieee"
        elif device.backend == "hip" and device.arch != "gfx942":
            # No TF32 on gfx90a: exact float32 operands instead.
            assert precision == "ieee" and dict(plan.constexprs)["IEEE"]
        else:
            assert precision == "tf32"


@pytest.mark.parametrize("device", PLANNED, ids=lambda d: d.arch)
def test_kind_matches_what_the_architecture_has(device):
    family = ARCH_FAMILY[device.arch]
    for problem in problems(dims=(256,), batches=(512,)):
        kind = plan_search(problem, device).config.kind
        sixteen = problem.queue_dtype != torch.float32
        if family == "mfma":
            assert kind == ("mma16" if sixteen and not problem.ieee else "fp32")
        else:
            assert kind == ("ieee" if problem.ieee else "mma16" if sixteen else "tf32")


@pytest.mark.parametrize("arch,why", [("sm_70", "FMA"), ("sm_75", "FMA"), ("sm_61", "compute capability < 7.0"),
                                      ("sm_87", "not among"), ("sm_103a", "not among")])
def test_unplanned_cuda_architectures_fall_back_naming_device_and_fix(arch, why):
    device = DeviceSpec("cuda", arch, 40, 65_536, "Some NVIDIA GPU")
    for ieee in (False, True):
        plan = plan_search(SearchProblem(256, 128, 10_000, torch.float32, torch.float16, ieee), device)
        assert not plan.fused and plan.config is None
        assert f"Some NVIDIA GPU ({arch})" in plan.fallback and why in plan.fallback
        assert "cuBLAS" in plan.fallback and "Fix:" in plan.fallback


@pytest.mark.parametrize("arch", ["gfx950", "gfx1100", "gfx908"])
def test_unplanned_amd_architectures_fall_back(arch):
    device = DeviceSpec("hip", arch, 100, 65_536, "Some AMD GPU")
    plan = plan_search(SearchProblem(256, 128, 10_000, torch.bfloat16, torch.bfloat16, False), device)
    assert not plan.fused
    assert f"Some AMD GPU ({arch})" in plan.fallback and "rocBLAS" in plan.fallback and "Fix:" in plan.fallback


def test_topk_above_the_kernel_limit_is_a_fallback_plan():
    plan = plan_search(SearchProblem(8, 64, 1000, torch.float32, torch.float32, False, k=17, lookup=False), INTERPRETER)
    assert not plan.fused and "k=17" in plan.fallback


@pytest.mark.parametrize("device", PLANNED, ids=lambda d: d.arch)
def test_small_batches_take_64_query_blocks_where_one_fits(device):
    family = ARCH_FAMILY[device.arch]
    for problem in problems(dims=(64, 128, 256, 512), batches=(32,)):
        plan = plan_search(problem, device)
        small = [c for c in CANDIDATES[family][plan.config.kind]
                 if c.block_b <= 64 and c.applies_to(problem) and plans.fits(c, problem, device)]
        assert plan.config.block_b == 64 or not small, plan.config.name
    # With D <= 128 every family has one.
    assert plan_search(SearchProblem(32, 128, 98_304, torch.float32, torch.bfloat16, False), device).config.block_b == 64


@pytest.mark.parametrize("device", PLANNED + [INTERPRETER], ids=lambda d: d.arch)
def test_grid_is_one_wave(device):
    for batch in (1, 32, 512, 4096):
        for num_rows in (1, 1000, 98_304):
            plan = plan_search(SearchProblem(batch, 256, num_rows, torch.bfloat16, torch.bfloat16, False), device)
            query_blocks, splits = plan.grid
            wave = device.num_sms * plan.config.ctas_per_sm
            assert splits >= 1 and (query_blocks * splits <= wave or splits == 1)


def test_plans_are_a_pure_function():
    device = DEVICES[2]
    problem = SearchProblem(512, 256, 98_304, torch.float32, torch.float32, False)
    assert plan_search(problem, device) == plan_search(dataclasses.replace(problem), dataclasses.replace(device))
    plan = plan_search(problem, device)
    assert plan.kernel_key == plan_search(dataclasses.replace(problem, batch=500), device).kernel_key


@pytest.mark.parametrize("kwargs,match", [
    (dict(backend="rocm"), "backend"),
    (dict(arch="ampere"), "arch"),
    (dict(num_sms=0), "num_sms"),
    (dict(smem_per_block=0), "smem_per_block"),
])
def test_device_spec_rejects_bad_fields_by_name(kwargs, match):
    fields = dict(backend="cuda", arch="sm_80", num_sms=108, smem_per_block=166_912)
    with pytest.raises(ValueError, match=match):
        DeviceSpec(**{**fields, **kwargs})


@pytest.mark.parametrize("arch,capability", [("sm_75", (7, 5)), ("sm_90a", (9, 0)), ("sm_100a", (10, 0)), ("sm_120", (12, 0))])
def test_capability_of_an_arch_name(arch, capability):
    assert DeviceSpec("cuda", arch, 1, 1).capability == capability


@pytest.mark.parametrize("device", PLANNED + [INTERPRETER], ids=lambda d: d.arch)
def test_the_first_pass_buffer_covers_whole_blocks(device):
    # The search kernel reads the normalised queries with no mask: the buffer must hold every
    # query block whole and D padded to whole chunks, and the first pass's grid must cover it.
    for problem in problems(dims=(1, 100, 256, 300, 512), batches=(1, 65, 512)):
        plan = plan_search(problem, device)
        if not plan.fused:
            continue
        const = dict(plan.constexprs)
        rows, cols = plan.query_buffer
        assert rows == plan.grid[0] * const["BLOCK_B"] >= problem.batch
        assert rows % plan.first_pass.rows == 0 and const["BLOCK_B"] % plan.first_pass.rows == 0
        assert cols >= problem.dim and cols % const["BLOCK_D"] == 0 and cols % const["NORM_D"] == 0
        assert cols == const["BLOCK_D"] or not const["D_RESIDENT"]
        sixteen_bit = problem.queue_dtype != torch.float32 and not const["IEEE"]
        assert plan.query_dtype == (problem.queue_dtype if sixteen_bit else torch.float32)


@pytest.mark.parametrize("device", PLANNED, ids=lambda d: d.arch)
def test_top_k_above_a_config_limit_takes_another_config(device):
    # Two 8-warp CTAs per SM leave 128 registers per thread: a top-16 list spills there.
    for problem in problems(dims=(128, 256), batches=(512,)):
        problem = dataclasses.replace(problem, normalize_queue=problem.k > 1 and problem.dim == 256)
        cfg = plan_search(problem, device).config
        assert problem.k <= cfg.max_topk and (cfg.raw_bank or not problem.normalize_queue), (problem, cfg.name)
        assert cfg.max_topk == MAX_KERNEL_TOPK or (cfg.ctas_per_sm > 1 and cfg.num_warps == 8), cfg.name
    if ARCH_FAMILY[device.arch] == "wgmma":
        def planned(k):
            return plan_search(SearchProblem(512, 256, 98_304, torch.bfloat16, torch.bfloat16, False, k, k == 1), device)
        assert planned(5).config.ctas_per_sm == 2 and planned(16).config.ctas_per_sm == 1
