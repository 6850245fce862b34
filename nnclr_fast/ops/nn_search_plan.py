"""Launch plans for the fused search kernel: a pure function of the problem and the device.

``plan_search(problem, device)`` returns the :class:`SearchPlan` the launcher in
``nn_search_triton.py`` runs: the config, the grid, the kernel's constexprs, warps and stages, or
the reason the fused kernel cannot run there (then the PyTorch path answers). It reads no GPU:
a :class:`DeviceSpec` describes one (``DeviceSpec.of(device)`` for a real one), so tests can ask
for the plan of any architecture and compile it offline.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import torch
import triton

try:  # Host-side TMA descriptors (Triton >= 3.4); without them every queue takes pointer loads.
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # pragma: no cover - depends on the installed Triton
    TensorDescriptor = None

# Largest k the register-resident running top-k handles; larger k takes the PyTorch path.
MAX_KERNEL_TOPK = 16
MAX_RESIDENT_D = 256


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

    @property
    def capability(self) -> Optional[tuple[int, int]]:
        """(major, minor) of a CUDA architecture, None elsewhere."""
        if self.backend != "cuda":
            return None
        digits = self.arch.removeprefix("sm_").rstrip("a")
        return int(digits[:-1]), int(digits[-1])

    @classmethod
    def of(cls, device: torch.device) -> "DeviceSpec":
        """The spec of a visible CUDA (or ROCm, which torch also calls "cuda") device."""
        props = torch.cuda.get_device_properties(device)
        if torch.version.hip is not None:
            arch = props.gcnArchName.split(":")[0]
            return cls("hip", arch, props.multi_processor_count, _smem_optin(props), props.name)
        major, minor = props.major, props.minor
        # Hopper and Blackwell datacenter parts: Triton compiles for the "a" variants.
        suffix = "a" if major in (9, 10) else ""
        return cls("cuda", f"sm_{major}{minor}{suffix}", props.multi_processor_count, _smem_optin(props), props.name)


def _smem_optin(props) -> int:
    # torch >= 2.? exposes the opt-in limit; older builds only the default 48 KiB one.
    return int(getattr(props, "shared_memory_per_block_optin", 0) or props.shared_memory_per_block)


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
    name: str
    kind: str  # "mma16" (bf16/fp16 queue), "tf32" (float32 queue), "ieee"
    d_resident: bool
    block_b: int
    block_k: int
    block_d: int  # D-chunk when not resident; resident configs use next_power_of_2(D)
    num_warps: int
    num_stages: int
    ctas_per_sm: int  # occupancy the grid is sized for; tests/ops/test_nn_search_triton.py checks it

    def block_d_for(self, dim: int) -> int:
        return max(16, triton.next_power_of_2(dim)) if self.d_resident else self.block_d


@dataclasses.dataclass(frozen=True)
class SearchPlan:
    """What the launcher runs; ``fallback`` says why the fused kernel cannot (then ``config`` is None)."""

    config: Optional[SearchConfig]
    grid: tuple[int, int] = (0, 0)
    constexprs: tuple[tuple[str, object], ...] = ()
    num_warps: int = 0
    num_stages: int = 0
    fallback: Optional[str] = None

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


CONFIGS = (
    SearchConfig("mma16_b128", "mma16", True, 128, 64, 0, 8, 3, 1),
    SearchConfig("mma16_b64", "mma16", True, 64, 128, 0, 4, 3, 1),
    SearchConfig("mma16_chunked", "mma16", False, 128, 128, 64, 8, 3, 1),
    SearchConfig("tf32_b128", "tf32", True, 128, 32, 0, 8, 3, 1),
    SearchConfig("tf32_b64", "tf32", True, 64, 32, 0, 4, 3, 1),
    SearchConfig("tf32_chunked", "tf32", False, 128, 64, 32, 8, 3, 1),
    SearchConfig("ieee_b64", "ieee", False, 64, 64, 32, 4, 3, 2),
)
_BY_NAME = {c.name: c for c in CONFIGS}
_INTERPRETER_CONFIG = SearchConfig("interpreter", "any", True, 16, 32, 32, 4, 1, 1)


def config_kind(queue_dtype: torch.dtype, ieee: bool) -> str:
    if ieee:
        return "ieee"
    return "tf32" if queue_dtype == torch.float32 else "mma16"


def pick_config(batch: int, dim: int, queue_dtype: torch.dtype, ieee: bool) -> SearchConfig:
    """The config for this problem on a GPU."""
    kind = config_kind(queue_dtype, ieee)
    if kind == "ieee":
        return _BY_NAME["ieee_b64"]
    if dim > MAX_RESIDENT_D:
        return _BY_NAME[f"{kind}_chunked"]
    return _BY_NAME[f"{kind}_b128" if batch > 64 else f"{kind}_b64"]


def num_splits_for(batch: int, num_rows: int, cfg: SearchConfig, sms: int) -> int:
    """Queue splits so that (query blocks x splits) is one wave of `cfg` over `sms` SMs, each
    split keeping >= 4 tiles so the pipeline prologue and the merge stay small."""
    query_blocks = triton.cdiv(batch, cfg.block_b)
    wave = sms * cfg.ctas_per_sm
    return max(1, min(wave // query_blocks, triton.cdiv(num_rows, 4 * cfg.block_k)))


def _has_tma(device: DeviceSpec) -> bool:
    if TensorDescriptor is None:
        return False
    if device.backend == "interpreter":
        return True
    return device.backend == "cuda" and device.capability[0] >= 9


def plan_search(problem: SearchProblem, device: DeviceSpec) -> SearchPlan:
    """The launch plan for ``problem`` on ``device`` (see the module docstring)."""
    if problem.k > MAX_KERNEL_TOPK:
        return SearchPlan(None, fallback=f"k={problem.k} is above the fused kernel's top-k limit ({MAX_KERNEL_TOPK})")
    if device.backend == "interpreter":
        cfg = _INTERPRETER_CONFIG
        if problem.dim > MAX_RESIDENT_D:
            cfg = dataclasses.replace(cfg, d_resident=False)
    else:
        cfg = pick_config(problem.batch, problem.dim, problem.queue_dtype, problem.ieee)
    block_d = cfg.block_d_for(problem.dim)
    splits = num_splits_for(problem.batch, problem.num_rows, cfg, device.num_sms)
    topk_pad = triton.next_power_of_2(problem.k)
    constexprs = dict(
        HAS_VALID=problem.has_valid,
        NORMALIZE_QUEUE=problem.normalize_queue,
        TOPK=problem.k,
        TOPK_PAD=topk_pad,
        LOOKUP=problem.lookup,
        IEEE=problem.ieee,
        # The interpreter mis-computes 16-bit dots: the kernel upcasts the rounded operands there.
        UPCAST_DOT=device.backend == "interpreter",
        USE_TMA=problem.queue_tma_layout and _has_tma(device),
        D_RESIDENT=cfg.d_resident,
        BLOCK_B=cfg.block_b,
        BLOCK_K=cfg.block_k,
        BLOCK_D=block_d,
        NORM_D=min(block_d, 32),
        MERGE_COLS=max(16, min(32, triton.next_power_of_2(splits * topk_pad))),
    )
    grid = (triton.cdiv(problem.batch, cfg.block_b), splits)
    return SearchPlan(cfg, grid, tuple(constexprs.items()), cfg.num_warps, cfg.num_stages)
