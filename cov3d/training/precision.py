"""Numeric precision chosen from the hardware: bf16 on a CPU only where the CPU computes it natively.

PyTorch runs bf16 convolutions on any x86 CPU, but only CPUs with AVX512-BF16
or AMX compute them in hardware; elsewhere oneDNN emulates them, and r3d_18
ran 20–120× slower than fp32 (docs/performance.md). `--precision auto` therefore
asks the hardware, and where the answer is uncertain (an unknown instruction-set
limit, a torch without the query, a non-x86 CPU) times one small convolution
both ways, once per machine, and caches the verdict in the user cache folder.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch

from cov3d import atomic
from cov3d.errors import Cov3dError

log = logging.getLogger(__name__)

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
TASKS = ("inference", "training")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}

# oneDNN's instruction-set limits (ONEDNN_MAX_CPU_ISA), lowest first; those from AVX512_CORE_BF16 on
# have bf16 dot products in hardware. AVX2_VNNI_2 converts bf16 but does no bf16 arithmetic.
_ONEDNN_ISAS = ("SSE41", "AVX", "AVX2", "AVX2_VNNI", "AVX2_VNNI_2", "AVX512_CORE", "AVX512_CORE_VNNI",
                "AVX512_CORE_BF16", "AVX10_1_512", "AVX512_CORE_FP16", "AVX10_1_512_AMX", "AVX512_CORE_AMX",
                "AVX10_1_512_AMX_FP16", "AVX512_CORE_AMX_FP16", "AVX10_2_512", "AVX10_2_512_AMX_2", "ALL", "DEFAULT")
_FIRST_BF16_ISA = _ONEDNN_ISAS.index("AVX512_CORE_BF16")
MEASUREMENT_FILE = "cpu-precision.json"


@dataclass(frozen=True)
class CpuInfo:
    """What this process's CPU offers torch, for choosing kernels and labelling benchmark figures."""

    model: str
    capability: str  # torch's ATen kernel level: DEFAULT, AVX2, AVX512…
    threads: int  # torch's intra-op threads
    cores: int  # logical CPUs this process may use
    avx512_bf16: bool | None  # None: this torch cannot say
    amx: bool | None
    isa_limit: str | None  # ONEDNN_MAX_CPU_ISA (or DNNL_MAX_CPU_ISA) if set

    def describe(self) -> str:
        """One line for logs and benchmark output: model, capability, bf16 hardware, threads."""
        bf16 = [name for name, has in (("AVX512-BF16", self.avx512_bf16), ("AMX", self.amx)) if has]
        limit = f", oneDNN limited to {self.isa_limit}" if self.isa_limit else ""
        return (f"{self.model}; torch capability {self.capability}; bf16 hardware: {', '.join(bf16) or 'none'}"
                f"{limit}; {self.threads} torch threads on {self.cores} CPUs")


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace").splitlines():
            if line.lower().startswith(("model name", "hardware", "cpu model")):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def _query(name: str) -> bool | None:
    check = getattr(torch.cpu, name, None)
    if check is None:
        return None
    try:
        return bool(check())
    except RuntimeError:
        return None


@lru_cache(maxsize=1)
def cpu_info() -> CpuInfo:
    """This CPU as torch sees it (cached for the process)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    limit = os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("DNNL_MAX_CPU_ISA")
    return CpuInfo(model=_cpu_model(), capability=torch.backends.cpu.get_cpu_capability(),
                   threads=torch.get_num_threads(), cores=cores, avx512_bf16=_query("_is_avx512_bf16_supported"),
                   amx=_query("_is_amx_tile_supported"), isa_limit=limit.strip().upper() if limit else None)


def hardware_bf16(info: CpuInfo) -> tuple[bool | None, str]:
    """(verdict, reason) from the CPU's flags alone; verdict None where the flags cannot settle it."""
    if platform.machine().lower() not in ("x86_64", "amd64", "i686", "x86"):
        return None, f"torch cannot say whether this {platform.machine()} CPU has native bf16"
    if info.avx512_bf16 is None or info.amx is None:
        return None, f"torch {torch.__version__} cannot say whether this CPU has native bf16"
    if not (info.avx512_bf16 or info.amx):
        return False, "this CPU has no native bf16 (neither AVX512-BF16 nor AMX), so bf16 would be emulated"
    if info.isa_limit:
        if info.isa_limit not in _ONEDNN_ISAS:
            return None, f"ONEDNN_MAX_CPU_ISA={info.isa_limit} is not an instruction-set limit cov3d knows"
        if _ONEDNN_ISAS.index(info.isa_limit) < _FIRST_BF16_ISA:
            return False, f"ONEDNN_MAX_CPU_ISA={info.isa_limit} keeps oneDNN from this CPU's bf16 instructions"
    if not info.capability.upper().startswith("AVX512"):
        return None, f"torch runs its own kernels at {info.capability} here, below the CPU's AVX-512"
    return True, f"this CPU computes bf16 natively ({'AMX' if info.amx else 'AVX512-BF16'})"


def _fingerprint(info: CpuInfo) -> str:
    keys = [info.model, info.capability, str(info.threads), str(info.avx512_bf16), str(info.amx),
            info.isa_limit or "", torch.__version__, platform.machine()]
    return hashlib.sha1("|".join(keys).encode()).hexdigest()[:16]


def best_seconds(run: Callable[[], object], repeats: int = 3) -> float:
    """The fastest of `repeats` calls of `run`, after one warm-up call (oneDNN builds its kernels on the first)."""
    run()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - start)
    return best


def time_bf16(repeats: int = 3) -> tuple[float, float]:
    """Best-of-`repeats` seconds of one small 3D convolution in fp32 and under bf16 autocast."""
    generator = torch.Generator().manual_seed(0)
    conv = torch.nn.Conv3d(16, 16, 3, padding=1).eval().to(memory_format=torch.channels_last_3d)
    x = torch.rand(1, 16, 8, 24, 24, generator=generator).contiguous(memory_format=torch.channels_last_3d)
    seconds = {}
    with torch.inference_mode():
        for name in ("fp32", "bf16"):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=name == "bf16"):
                seconds[name] = best_seconds(lambda: conv(x), repeats)
    return seconds["fp32"], seconds["bf16"]


def cached_timing(name: str, measure: Callable[[], tuple[float, float]], cache: Path | None) -> tuple[float, float]:
    """(fp32, bf16) seconds of `name` on this machine: from `cache`'s measurement file, else measured and saved.

    Entries are keyed by the machine's fingerprint (CPU, capability, threads,
    instruction-set limit, torch version) and `name`, so another CPU or torch
    measures again. An unreadable or unwritable file only costs a measurement.
    """
    key = f"{_fingerprint(cpu_info())}:{name}"
    file = cache / MEASUREMENT_FILE if cache else None
    saved: dict = {}
    if file is not None and file.is_file():
        try:
            saved = json.loads(file.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            saved = {}
    saved = saved if isinstance(saved, dict) else {}
    entry = saved.get(key)
    if (isinstance(entry, dict) and all(isinstance(entry.get(k), float) and entry[k] > 0 for k in ("fp32", "bf16"))):
        return entry["fp32"], entry["bf16"]  # (a damaged entry, zero or negative, is measured again)
    fp32, bf16 = measure()
    if file is not None:
        try:
            atomic.write_text(file, json.dumps({**saved, key: {"fp32": fp32, "bf16": bf16,
                                                                "cpu": cpu_info().describe()}}, indent=2) + "\n")
        except OSError as error:
            log.debug("could not cache the precision measurement in %s: %s", file, error)
    return fp32, bf16


def measured_bf16(info: CpuInfo, cache: Path | None) -> tuple[bool, str]:
    """Native bf16 by measurement: bf16 must beat fp32 on a small convolution. Cached per machine in `cache`."""
    fp32, bf16 = cached_timing("conv3d-probe", lambda: time_bf16(), cache)
    native = bf16 < 0.8 * fp32
    ratio = bf16 / fp32 if fp32 else float("inf")
    how = "natively" if native else "no faster than fp32, so it is likely emulated"
    return native, f"bf16 measured {ratio:.2f}× fp32's time on this CPU: computed {how}"


def default_cache() -> Path:
    """Where measurements are cached: the user cache folder (see :func:`cov3d.data.preprocess.cache_root`)."""
    from cov3d.data.preprocess import cache_root  # a leaf helper; imported here to keep this module light

    return cache_root()


def cpu_bf16(cache: Path | None = None) -> tuple[bool, str]:
    """(native, reason): whether this CPU computes bf16 in hardware, by its flags or else by measurement."""
    info = cpu_info()
    verdict, reason = hardware_bf16(info)
    if verdict is not None:
        return verdict, reason
    native, measured = measured_bf16(info, cache or default_cache())
    return native, f"{reason}; {measured}"


@dataclass(frozen=True)
class Choice:
    """A resolved precision and why, as logged and as recorded in config.json and metrics.json."""

    precision: str  # fp32 | bf16 | fp16
    reason: str

    def record(self) -> dict[str, str]:
        return {"precision": self.precision, "precision_reason": self.reason}


_announced: set[str] = set()


def _announce(choice: Choice, level: int = logging.INFO) -> None:
    message = f"{choice.precision}: {choice.reason}"
    if message not in _announced:  # once per process, however many runs or members ask
        _announced.add(message)
        log.log(level, "%s", message)


def resolve_precision(requested: str, device: torch.device | str, task: str = "inference",
                      cache: Path | None = None) -> Choice:
    """The precision a run uses: `requested` if explicit (checked against the device), else by the hardware.

    auto: fp16 mixed precision on CUDA. On a CPU, inference takes bf16 only where
    the CPU computes it natively and fp32 elsewhere (`predict` then also checks,
    per model and input size, that bf16 is the faster: see
    :func:`faster_of_fp32_and_bf16`); training takes fp32 (bf16 training lowered
    validation F1 on the demo, see docs/performance.md).
    """
    device = torch.device(device)
    if requested not in PRECISIONS:
        raise Cov3dError(f"--precision {requested} is not one of {', '.join(PRECISIONS)}")
    if task not in TASKS:
        raise ValueError(f"task {task!r} is not one of {TASKS}")
    if requested == "fp16" and device.type != "cuda":
        raise Cov3dError("--precision fp16 needs a CUDA device; use bf16 or fp32 on CPU")
    if device.type != "cpu":
        choice = Choice(requested if requested != "auto" else "fp16",
                        "mixed precision on the GPU" if requested == "auto" else "as asked")
        _announce(choice)
        return choice
    if requested == "fp32":
        return Choice("fp32", "as asked")
    if requested == "auto" and task == "training":  # no need to ask the CPU: training's auto is fp32 on any
        choice = Choice("fp32", "training on a CPU stays in fp32 (bf16 training lowered validation F1; "
                                "--precision bf16 is there to choose)")
        _announce(choice)
        return choice
    native, why = cpu_bf16(cache)
    if requested == "bf16":
        choice = Choice("bf16", "as asked" if native else f"as asked, although {why}")
        if not native:
            _announce(Choice("bf16", f"asked for, but {why}: expect it many times slower than --precision fp32"),
                      logging.WARNING)
        return choice
    choice = Choice("bf16", why) if native else Choice("fp32", why)
    _announce(choice)
    return choice


def faster_of_fp32_and_bf16(choice: Choice, name: str, measure: Callable[[], tuple[float, float]],
                            cache: Path | None = None) -> Choice:
    """`choice` (auto's bf16 on a CPU) kept only if bf16 beats fp32 for the workload `name`, else fp32.

    Native bf16 still lost to fp32 for small inputs and grouped or 2D networks
    (regnet3d, resnet50 at 16×32×32: docs/performance.md), so auto never picks
    the slower one: `measure()` times both once per machine and workload.
    """
    fp32, bf16 = cached_timing(name, measure, cache or default_cache())
    if bf16 < fp32:
        return choice
    slower = Choice("fp32", f"{choice.reason}, but bf16 measured {bf16 / fp32:.2f}× fp32's time for {name}")
    _announce(slower)
    return slower


def fold_batchnorm(model: torch.nn.Module) -> torch.nn.Module | None:
    """An inference copy of `model` with each BatchNorm that directly follows a convolution folded into it.

    Uses torch.fx, so it applies to networks without shape-dependent control
    flow; returns None for the others (they then run as they are). The copy
    computes the same function in evaluation mode up to float rounding.
    """
    import copy

    from torch.fx.proxy import TraceError
    from torch.nn.modules.batchnorm import _BatchNorm
    from torch.nn.modules.conv import _ConvNd
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    class Tracer(torch.fx.Tracer):  # subclasses of Conv and BatchNorm (torchvision's Conv3DSimple) stay whole
        def is_leaf_module(self, module: torch.nn.Module, name: str) -> bool:
            return isinstance(module, (_ConvNd, _BatchNorm)) or super().is_leaf_module(module, name)

    try:
        root = copy.deepcopy(model).eval()
        graph = torch.fx.GraphModule(root, Tracer().trace(root))
    except (TraceError, TypeError, NotImplementedError) as error:
        log.debug("BatchNorm not folded in %s: %s", type(model).__name__, error)
        return None
    modules = dict(graph.named_modules())
    folded = 0
    for node in list(graph.graph.nodes):
        if node.op != "call_module" or not isinstance(modules[node.target], _BatchNorm):
            continue
        source = node.args[0]
        if not (isinstance(source, torch.fx.Node) and source.op == "call_module" and len(source.users) == 1
                and isinstance(modules[source.target], _ConvNd)):
            continue
        bn, conv = modules[node.target], modules[source.target]
        if not bn.track_running_stats or bn.running_mean is None:
            continue
        parent, _, name = source.target.rpartition(".")
        setattr(graph.get_submodule(parent) if parent else graph, name, fuse_conv_bn_eval(conv, bn))
        node.replace_all_uses_with(source)
        graph.graph.erase_node(node)
        folded += 1
    graph.graph.lint()
    graph.delete_all_unused_submodules()
    graph.recompile()
    log.debug("folded %d BatchNorm layers of %s", folded, type(model).__name__)
    return graph
