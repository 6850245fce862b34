"""Launch plans for the fused search kernel: a pure function of the problem and the device.

``plan_search(problem, device)`` returns the :class:`SearchPlan` the launcher in
``nn_search_triton.py`` runs: the config, the grid, the kernel's constexprs, warps and stages, or
the reason the fused kernel cannot run there (then the PyTorch path answers). It reads no GPU:
a :class:`DeviceSpec` describes one (``DeviceSpec.of(device)`` for a real one), so tests can ask
for the plan of any architecture and compile it offline.

How a plan is chosen:

  * the architecture's kernel family (``ARCH_FAMILY``) says what Triton makes of the kernel's
    dot there and how it buffers the queue. Only the architectures whose plans
    tests/ops/test_nn_search_triton.py compiles and checks are listed; any other architecture,
    and those on which Triton compiles the dot to FMA instead of tensor cores (sm_70, sm_75),
    get a fallback whose reason names the device and the fix;
  * the config: the first of the family's candidates (``CANDIDATES``, best first; with B <= 64
    the 64-query blocks first) that applies to D and whose shared-memory estimate
    (``smem_estimate``, an upper bound the compile matrix checks) leaves ``SMEM_MARGIN`` of the
    device's per-block limit free, so a compiler version that moves the layout by a few KiB
    still launches;
  * the grid: one wave of that config over the device's SMs (``num_splits_for``).

The candidates' order is a judgement (bigger query blocks read the queue fewer times, resident
queries are not re-read per tile, deeper pipelines hide more latency), not a measurement: no plan
has been timed on a GPU yet.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import re
from typing import Optional

import torch

try:  # Host-side TMA descriptors (Triton >= 3.4); without them every queue takes pointer loads.
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # pragma: no cover - depends on the installed Triton (none on macOS / Windows)
    TensorDescriptor = None

# Largest k the register-resident running top-k handles; larger k takes the PyTorch path.
MAX_KERNEL_TOPK = 16
# Queries stay resident (loaded once per program) up to this D; above it they are re-read per D-chunk.
MAX_RESIDENT_D = 256
# Shared memory a plan leaves free below the device's per-block limit: compiler versions move
# the layout by a few KiB (Triton 3.6-3.9 differ by <= 0.5 KiB on this kernel).
SMEM_MARGIN = 8 << 10
# 32-bit registers per SM on every CUDA architecture planned for.
REGISTERS_PER_SM = 65_536

_BACKENDS = ("cuda", "hip", "interpreter")
_CUDA_ARCH = re.compile(r"sm_(\d+)(\d)a?")


class FusedSearchUnavailable(RuntimeError):
    """The fused kernel cannot run a call on its device; the message says which device, why and
    the fix. Raised to the caller only in strict mode (``NNCLR_FAST_STRICT=1``); otherwise the
    PyTorch path answers, after one warning."""


@dataclasses.dataclass(frozen=True)
class DeviceSpec:
    """What a launch plan needs to know of a device.

    ``backend`` is "cuda", "hip" or "interpreter"; ``arch`` is e.g. "sm_90a", "sm_80" or
    "gfx942"; ``smem_per_block`` is the opt-in maximum of shared memory (LDS) per block, bytes.
    """

    backend: str
    arch: str
    num_sms: int
    smem_per_block: int
    name: str = ""

    def __post_init__(self):
        if self.backend not in _BACKENDS:
            raise ValueError(f"DeviceSpec.backend must be one of {_BACKENDS}, got {self.backend!r}")
        if self.backend == "cuda" and not _CUDA_ARCH.fullmatch(self.arch):
            raise ValueError(f"DeviceSpec.arch of a CUDA device must look like 'sm_80' or 'sm_90a', got {self.arch!r}")
        if self.num_sms < 1:
            raise ValueError(f"DeviceSpec.num_sms must be positive, got {self.num_sms}")
        if self.smem_per_block < 1:
            raise ValueError(f"DeviceSpec.smem_per_block must be positive (bytes), got {self.smem_per_block}")

    @property
    def capability(self) -> Optional[tuple[int, int]]:
        """(major, minor) of a CUDA architecture, None elsewhere."""
        if self.backend != "cuda":
            return None
        major, minor = _CUDA_ARCH.fullmatch(self.arch).groups()
        return int(major), int(minor)

    def describe(self) -> str:
        """The device as a message names it, e.g. "NVIDIA A100-SXM4-80GB (sm_80)"."""
        return f"{self.name} ({self.arch})" if self.name else self.arch

    @classmethod
    def of(cls, device: torch.device) -> "DeviceSpec":
        """The spec of a visible CUDA (or ROCm, which torch also calls "cuda") device."""
        index = device.index if device.index is not None else torch.cuda.current_device()
        return _device_spec(index)


@functools.lru_cache(maxsize=None)
def _device_spec(index: int) -> DeviceSpec:
    props = torch.cuda.get_device_properties(index)
    smem = _smem_optin(props)
    if torch.version.hip is not None:
        # ROCm reports a capability such as (9, 4) for gfx942: the arch name is what counts.
        return DeviceSpec("hip", props.gcnArchName.split(":")[0], props.multi_processor_count, smem, props.name)
    major, minor = props.major, props.minor
    # Hopper and datacenter Blackwell: Triton compiles for the "a" variants.
    suffix = "a" if major in (9, 10) else ""
    return DeviceSpec("cuda", f"sm_{major}{minor}{suffix}", props.multi_processor_count, smem, props.name)


def _smem_optin(props) -> int:
    # The opt-in limit where torch exposes it; older builds only the default 48 KiB one.
    return int(getattr(props, "shared_memory_per_block_optin", 0) or props.shared_memory_per_block)


def interpreting() -> bool:
    """TRITON_INTERPRET=1: Triton kernels run on CPU tensors in Triton's interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


# Triton's interpreter: no resource limits; enough "SMs" that the CPU tests exercise the merge.
INTERPRETER = DeviceSpec("interpreter", "interpreter", 6, 1 << 30, "Triton interpreter")


@dataclasses.dataclass(frozen=True)
class SearchProblem:
    """One call of the search: shapes, dtypes and the options that change the kernel."""

    batch: int
    dim: int
    num_rows: int
    z_dtype: torch.dtype
    queue_dtype: torch.dtype
    ieee: bool
    k: int = 1
    lookup: bool = True
    normalize_queue: bool = False
    has_valid: bool = False
    # The queue's layout allows TMA descriptors: contiguous rows, 16-byte aligned base and row stride.
    queue_tma_layout: bool = True

    @classmethod
    def of(cls, z: torch.Tensor, queue: torch.Tensor, k: int, lookup: bool, ieee: bool, normalize_queue: bool,
           has_valid: bool) -> "SearchProblem":
        item = queue.element_size()
        tma_layout = queue.stride(1) == 1 and queue.data_ptr() % 16 == 0 and (queue.stride(0) * item) % 16 == 0
        return cls(z.shape[0], z.shape[1], queue.shape[0], z.dtype, queue.dtype, bool(ieee), k, lookup,
                   bool(normalize_queue), has_valid, tma_layout)


@dataclasses.dataclass(frozen=True)
class SearchConfig:
    """Tile shape and schedule of the kernel. ``kind`` is the dot's operand type: "mma16"
    (bf16/fp16 tensor cores), "tf32", "ieee" (exact float32 on CUDA cores) or "fp32" (exact float32
    on AMD's matrix cores, which also serve "tf32" there)."""

    kind: str
    d_resident: bool
    block_b: int
    block_k: int
    block_d: int  # D-chunk when not resident; resident configs use next_power_of_2(D)
    num_warps: int
    num_stages: int
    ctas_per_sm: int = 1  # occupancy the grid is sized for; the compile matrix checks it is reached
    # What the registers ctas_per_sm CTAs leave each thread hold without spilling (the compile
    # matrix checks both limits at the edge): the largest running top-k (two 8-warp CTAs: 128
    # registers, where a top-16 list spills), and whether the per-tile queue norms of
    # normalize_queue fit next to it.
    max_topk: int = MAX_KERNEL_TOPK
    raw_bank: bool = True

    @property
    def name(self) -> str:
        chunk = "" if self.d_resident else f"d{self.block_d}"
        ctas = f"c{self.ctas_per_sm}" if self.ctas_per_sm > 1 else ""
        return f"{self.kind}_b{self.block_b}k{self.block_k}{chunk}_w{self.num_warps}s{self.num_stages}{ctas}"

    def block_d_for(self, dim: int) -> int:
        return max(16, _next_power_of_2(dim)) if self.d_resident else self.block_d

    def applies_to(self, problem: "SearchProblem") -> bool:
        return ((not self.d_resident or _next_power_of_2(problem.dim) <= MAX_RESIDENT_D)
                and problem.k <= self.max_topk and (self.raw_bank or not problem.normalize_queue))


def _resident(kind, block_b, block_k, num_warps, num_stages, ctas_per_sm=1, max_topk=MAX_KERNEL_TOPK,
              raw_bank=True) -> SearchConfig:
    return SearchConfig(kind, True, block_b, block_k, 0, num_warps, num_stages, ctas_per_sm, max_topk, raw_bank)


def _chunked(kind, block_b, block_k, block_d, num_warps, num_stages, ctas_per_sm=1,
             max_topk=MAX_KERNEL_TOPK) -> SearchConfig:
    return SearchConfig(kind, False, block_b, block_k, block_d, num_warps, num_stages, ctas_per_sm, max_topk)


# Architecture -> kernel family: what Triton makes of the kernel there.
#   mma_sync: HMMA (mma.sync); the queue pipelined through num_stages - 1 shared-memory buffers
#             (cp.async, or TMA on sm_120), the resident query block in shared memory, both
#             operands re-read into registers (ldmatrix) every tile;
#   wgmma / tcgen05: Hopper's / datacenter Blackwell's MMA, reading both operands straight from
#             shared memory (the query block, loaded once, and num_stages TMA queue buffers);
#   mfma:     AMD's matrix cores (wave64); num_stages - 1 LDS buffers, the resident query block
#             staged through LDS once before the loop (then held in registers).
ARCH_FAMILY = {
    "sm_80": "mma_sync",
    "sm_86": "mma_sync",
    "sm_89": "mma_sync",
    "sm_120": "mma_sync",
    "sm_90a": "wgmma",
    "sm_100a": "tcgen05",
    "gfx90a": "mfma",
    "gfx942": "mfma",
}
# CUDA architectures where Triton compiles tl.dot to FMA, without tensor-core instructions
# (checked on the PTX of Triton 3.8: no mma at all).
NO_TENSOR_CORES = ("sm_70", "sm_75")

# Candidates, best first (see the module docstring). Hopper's 16-bit config is the one the
# static model (benchmarks/kernel_report.py) rates best: a 32-row queue tile keeps it at 112 KiB
# with D=256, so two CTAs share an SM and each one's epilogue and barriers run under the other's
# wgmma. A float32 query block is twice that size: one CTA per SM at D=256. Two 8-warp CTAs leave
# 128 registers per thread, too few for a top-16 list: a one-CTA twin follows each.
_HOPPER_CLASS = {  # wgmma and tcgen05: 227 KiB per block
    "mma16": (_resident("mma16", 128, 32, 8, 3, ctas_per_sm=2, max_topk=8), _resident("mma16", 128, 32, 8, 3),
              _resident("mma16", 64, 32, 4, 3, ctas_per_sm=2), _chunked("mma16", 128, 64, 64, 8, 3)),
    # At D=256 three float32 stages (224 KiB) leave less than the margin: two stages then.
    "tf32": (_resident("tf32", 128, 32, 8, 3, ctas_per_sm=2, max_topk=8), _resident("tf32", 128, 32, 8, 2),
             _resident("tf32", 64, 32, 4, 3), _chunked("tf32", 128, 32, 64, 8, 3)),
    "ieee": (_chunked("ieee", 64, 32, 16, 4, 3, ctas_per_sm=2),),
}
CANDIDATES = {
    "wgmma": _HOPPER_CLASS,
    "tcgen05": _HOPPER_CLASS,
    # 163 KiB (sm_80) or 99 KiB (sm_86, sm_89, sm_120) per block. Two 81 KiB CTAs share an A100
    # SM at D=256, of 4 warps each: each warp loads its rows of the query block and the whole
    # queue tile by ldmatrix every tile, so fewer warps per CTA read less shared memory (the
    # model rates it 1.4x the 8-warp CTA). A 99 KiB part takes the 16-row queue tile at D=256.
    # Where a raw bank's per-tile norms spill registers (the 4-warp CTA at D=256, resident float32
    # blocks), a raw bank takes the next config.
    "mma_sync": {
        "mma16": (_resident("mma16", 128, 32, 4, 2, ctas_per_sm=2, raw_bank=False), _resident("mma16", 128, 16, 8, 3),
                  _resident("mma16", 64, 32, 4, 3), _chunked("mma16", 128, 32, 64, 8, 2, ctas_per_sm=2, max_topk=5),
                  _chunked("mma16", 128, 64, 32, 8, 3)),
        "tf32": (_resident("tf32", 128, 32, 8, 2, raw_bank=False), _resident("tf32", 64, 32, 4, 2, raw_bank=False),
                 _resident("tf32", 64, 16, 4, 2, raw_bank=False), _chunked("tf32", 128, 64, 32, 8, 3)),
        "ieee": (_chunked("ieee", 64, 32, 16, 4, 3, ctas_per_sm=2),),
    },
    # 64 KiB of LDS per block.
    "mfma": {
        "mma16": (_resident("mma16", 128, 64, 8, 2), _resident("mma16", 64, 64, 4, 2), _chunked("mma16", 128, 64, 32, 8, 2)),
        "fp32": (_resident("fp32", 64, 32, 4, 2), _chunked("fp32", 64, 64, 32, 4, 2)),
    },
}
_INTERPRETER_CONFIG = SearchConfig("any", True, 16, 32, 32, 4, 1, 1)


def config_kind(problem: SearchProblem, family: str) -> str:
    """The operand type of the dot: see SearchConfig.kind."""
    sixteen_bit = problem.queue_dtype in (torch.bfloat16, torch.float16)
    if family == "mfma":
        return "mma16" if sixteen_bit and not problem.ieee else "fp32"
    if problem.ieee:
        return "ieee"
    return "mma16" if sixteen_bit else "tf32"


def smem_estimate(cfg: SearchConfig, problem: SearchProblem, device: DeviceSpec) -> int:
    """Upper bound of the shared memory (bytes) ``cfg`` takes for ``problem`` on ``device``.

    The pipelined queue tiles (wgmma and tcgen05 keep a buffer per stage, mma.sync and MFMA one
    fewer, TMA or not) and the query block in the dot's operand dtype: resident, once (on AMD
    staged through LDS before the loop, so not live at the same time as the tiles); with
    D-chunks, a buffer per stage, plus a converted queue chunk when the queue's dtype is not the
    operand's. Then the scratch: wgmma's warps split the query rows only, so its reductions stay
    in a warp (512 bytes cover its barriers and the odd layout conversion); elsewhere BLOCK_B x 8 bytes of cross-warp reduction
    scratch, plus the mbarriers of TMA stages. The compile matrix checks every plan against it.
    """
    family = ARCH_FAMILY[device.arch]
    operand = 4 if cfg.kind in ("tf32", "ieee", "fp32") else 2
    queue_item = problem.queue_dtype.itemsize
    block_d = cfg.block_d_for(problem.dim)
    async_mma = family in ("wgmma", "tcgen05")
    tiles = (cfg.num_stages if async_mma else cfg.num_stages - 1) * cfg.block_k * block_d * queue_item
    if async_mma:
        scratch = 512
    else:
        scratch = cfg.block_b * 8 + (16 * cfg.num_stages if problem.queue_tma_layout and _has_tma(device) else 0)
    if cfg.d_resident:
        queries = cfg.block_b * block_d * operand
        return (max(queries, tiles) if family == "mfma" else queries + tiles) + scratch
    queries = cfg.num_stages * cfg.block_b * block_d * operand
    converted_queue = cfg.block_k * block_d * operand if queue_item != operand else 0
    return queries + tiles + converted_queue + scratch


def fits(cfg: SearchConfig, problem: SearchProblem, device: DeviceSpec) -> bool:
    """``cfg``'s estimate leaves SMEM_MARGIN free, and ``ctas_per_sm`` of them share an SM (whose
    shared memory is the per-block limit plus the 1 KiB every block reserves)."""
    need = smem_estimate(cfg, problem, device)
    return (need + SMEM_MARGIN <= device.smem_per_block
            and cfg.ctas_per_sm * (need + 1024) <= device.smem_per_block + 1024)


def _next_power_of_2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def num_splits_for(batch: int, num_rows: int, cfg: SearchConfig, sms: int) -> int:
    """Queue splits so that (query blocks x splits) is one wave of `cfg` over `sms` SMs, each
    split keeping >= 4 tiles so the pipeline prologue and the merge stay small."""
    query_blocks = _cdiv(batch, cfg.block_b)
    wave = sms * cfg.ctas_per_sm
    return max(1, min(wave // query_blocks, _cdiv(num_rows, 4 * cfg.block_k)))


def _has_tma(device: DeviceSpec) -> bool:
    # Never on HIP, whatever capability ROCm reports.
    if TensorDescriptor is None:
        return False
    if device.backend == "interpreter":
        return True
    return device.backend == "cuda" and device.capability[0] >= 9


def _dot_precision(problem: SearchProblem, device: DeviceSpec) -> str:
    # The input precision only matters for float32 operands. A 16-bit dot asks for "ieee" (exact
    # for them everywhere): Triton's AMD backend rejects "tf32" outside gfx942. Without TF32
    # (gfx90a) a float32 queue gets exact float32, more precise than "default" promises.
    if problem.ieee or problem.queue_dtype != torch.float32:
        return "ieee"
    if device.backend == "hip" and device.arch != "gfx942":
        return "ieee"
    return "tf32"


def _blas(device: DeviceSpec) -> str:
    return {"cuda": "cuBLAS", "hip": "rocBLAS"}.get(device.backend, "CPU")


def fallback_plan(device: DeviceSpec, why: str, fix: str) -> SearchPlan:
    """A plan that runs the PyTorch path, with a reason naming the device, why and the fix."""
    return SearchPlan(None, fallback=f"{device.describe()}: {why}; the PyTorch path ({_blas(device)} matmuls) "
                                     f"answers instead. Fix: {fix}")


def _unplanned(device: DeviceSpec) -> Optional[SearchPlan]:
    """The fallback for an architecture without plans, or None."""
    if device.backend == "interpreter" or device.arch in ARCH_FAMILY:
        return None
    covered = ", ".join(ARCH_FAMILY)
    if device.arch in NO_TENSOR_CORES:
        return fallback_plan(
            device, f"Triton compiles the kernel's dot to FMA on {device.arch}, without its tensor cores",
            "none needed for correct results; the fused kernel needs compute capability 8.0 or newer")
    if device.backend == "cuda" and device.capability < (7, 0):
        return fallback_plan(device, f"Triton does not support {device.arch} (compute capability < 7.0)",
                             "none needed for correct results; the fused kernel needs compute capability 8.0 or newer")
    return fallback_plan(
        device, f"{device.arch} is not among the architectures whose launch plans are compiled and checked ({covered})",
        f"none needed for correct results; to run the fused kernel, add {device.arch} to ARCH_FAMILY in "
        "nnclr_fast/ops/nn_search_plan.py and to the compile matrix in tests/ops/test_nn_search_triton.py")


@dataclasses.dataclass(frozen=True)
class FirstPassConfig:
    """Launch config of the first pass (normalising the queries into the padded query buffer).
    ``rows`` per program divides every BLOCK_B, so the grid covers the buffer exactly; one stage:
    its two passes over a row are latency-bound and nothing is gained by buffering them."""

    rows: int = 16
    num_warps: int = 4
    num_stages: int = 1


FIRST_PASS = FirstPassConfig()


@dataclasses.dataclass(frozen=True)
class SearchPlan:
    """What the launcher runs; ``fallback`` says why the fused kernel cannot (then ``config`` is None)."""

    config: Optional[SearchConfig]
    grid: tuple[int, int] = (0, 0)
    constexprs: tuple[tuple[str, object], ...] = ()
    num_warps: int = 0
    num_stages: int = 0
    fallback: Optional[str] = None
    # CUDA: the registers per thread ptxas may use (.maxnreg). Without it ptxas caps a kernel
    # near an occupancy step of its own choosing (128 registers at 8 warps) and spills a few bytes.
    maxnreg: Optional[int] = None
    # The first pass's output: (query blocks x BLOCK_B, D padded to whole D-chunks) normalised
    # queries in the dot's operand dtype (the queue's 16-bit dtype, else float32).
    query_buffer: tuple[int, int] = (0, 0)
    query_dtype: Optional[torch.dtype] = None
    first_pass: FirstPassConfig = FIRST_PASS

    @property
    def fused(self) -> bool:
        return self.fallback is None

    @property
    def use_tma(self) -> bool:
        return bool(dict(self.constexprs).get("USE_TMA", False))

    @property
    def block_shape(self) -> tuple[int, int]:
        """(BLOCK_K, BLOCK_D): the queue tile a TMA descriptor must describe."""
        c = dict(self.constexprs)
        return c["BLOCK_K"], c["BLOCK_D"]

    @property
    def kernel_key(self) -> tuple:
        """What identifies the compiled kernel (the grid does not): one compile serves every plan
        with the same key."""
        return self.constexprs, self.num_warps, self.num_stages, self.maxnreg, self.query_dtype, self.first_pass


def choose_config(problem: SearchProblem, device: DeviceSpec) -> Optional[SearchConfig]:
    """The first of the family's candidates that applies to D and fits the device, or None."""
    family = ARCH_FAMILY[device.arch]
    candidates = [c for c in CANDIDATES[family][config_kind(problem, family)] if c.applies_to(problem)]
    if problem.batch <= 64:
        # A 128-query block would be more than half padding: 64-query blocks first (stable sort).
        candidates.sort(key=lambda c: c.block_b > 64)
    return next((c for c in candidates if fits(c, problem, device)), None)


@functools.lru_cache(maxsize=4096)
def plan_search(problem: SearchProblem, device: DeviceSpec) -> SearchPlan:
    """The launch plan for ``problem`` on ``device`` (see the module docstring)."""
    if problem.k > MAX_KERNEL_TOPK:
        return fallback_plan(device, f"k={problem.k} is above the fused kernel's top-k limit ({MAX_KERNEL_TOPK})",
                             f"none needed: nn_topk with k > {MAX_KERNEL_TOPK} always takes the PyTorch path")
    unplanned = _unplanned(device)
    if unplanned is not None:
        return unplanned
    if device.backend == "interpreter":
        cfg = _INTERPRETER_CONFIG
        if problem.dim > MAX_RESIDENT_D:
            cfg = dataclasses.replace(cfg, d_resident=False)
    else:
        cfg = choose_config(problem, device)
        if cfg is None:
            return fallback_plan(
                device, f"no config of the fused kernel fits D={problem.dim} into {device.smem_per_block // 1024} KiB "
                f"of shared memory per block with {SMEM_MARGIN // 1024} KiB to spare",
                "none needed for correct results; report the device and D to nnclr_fast")
    return plan_with(cfg, problem, device)


def plan_with(cfg: SearchConfig, problem: SearchProblem, device: DeviceSpec) -> SearchPlan:
    """The plan that runs ``cfg`` for ``problem`` on ``device`` (whether it fits is plan_search's
    business; benchmarks/kernel_report.py compiles every candidate through this)."""
    block_d = cfg.block_d_for(problem.dim)
    splits = num_splits_for(problem.batch, problem.num_rows, cfg, device.num_sms)
    topk_pad = _next_power_of_2(problem.k)
    dot_precision = _dot_precision(problem, device)
    constexprs = dict(
        HAS_VALID=problem.has_valid,
        NORMALIZE_QUEUE=problem.normalize_queue,
        TOPK=problem.k,
        TOPK_PAD=topk_pad,
        LOOKUP=problem.lookup,
        # Exact float32 operands: asked for, or a float32 queue where there is no TF32 (gfx90a).
        IEEE=problem.ieee or dot_precision == "ieee" and problem.queue_dtype == torch.float32,
        DOT_PRECISION=dot_precision,
        # The interpreter mis-computes 16-bit dots: the kernel upcasts the rounded operands there.
        UPCAST_DOT=device.backend == "interpreter",
        USE_TMA=problem.queue_tma_layout and _has_tma(device),
        D_RESIDENT=cfg.d_resident,
        BLOCK_B=cfg.block_b,
        BLOCK_K=cfg.block_k,
        BLOCK_D=block_d,
        NORM_D=min(block_d, 32),
        MERGE_COLS=max(16, min(32, _next_power_of_2(splits * topk_pad))),
    )
    grid = (_cdiv(problem.batch, cfg.block_b), splits)
    maxnreg = None
    if device.backend == "cuda":
        # As many as let ctas_per_sm CTAs share the 64 K-register file, at most 255.
        maxnreg = min(255, REGISTERS_PER_SM // (cfg.ctas_per_sm * cfg.num_warps * 32))
    sixteen_bit = problem.queue_dtype in (torch.bfloat16, torch.float16) and not constexprs["IEEE"]
    query_buffer = (grid[0] * cfg.block_b, _cdiv(problem.dim, block_d) * block_d)
    return SearchPlan(cfg, grid, tuple(constexprs.items()), cfg.num_warps, cfg.num_stages, maxnreg=maxnreg,
                      query_buffer=query_buffer, query_dtype=problem.queue_dtype if sixteen_bit else torch.float32)
