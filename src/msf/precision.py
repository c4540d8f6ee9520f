"""Which float precision msf runs in: bf16 where the hardware runs it natively, fp32 elsewhere.

Every place that picks a precision (training's autocast, sampling, sample sets, comparisons,
feature networks, the quality log) takes ``"auto"`` by default and asks :func:`resolve_precision`.

* CUDA: bf16 where the GPU supports it (fp32 matrix products then run in TF32, see ``msf.speed.tf32``).
* CPU: bf16 only with AVX512-BF16 or AMX instructions that ATen and oneDNN are allowed to use.
  Without them bf16 is emulated: a bf16 matrix product ran 140x slower than fp32 on an AVX2-only
  CPU (docs/benchmarks.md). Where the flags cannot tell (another architecture, or oneDNN capped by
  ``ONEDNN_MAX_CPU_ISA``), a one-off micro-benchmark of both decides, cached for the process.
* ``MSF_NATIVE_BF16=1`` or ``0`` overrides the CPU's answer (to run a whole suite down one branch).

An explicit ``"bf16"`` on a CPU without native bf16 still runs, with a one-line warning.
"""

from __future__ import annotations

import functools
import os
import sys
import time

import torch

AUTO = "auto"
_BF16_VALUES = ("bf16", "bf16-weights")  # the sampling precisions that compute in bf16
_said: set[tuple] = set()


@functools.cache
def _matmul_seconds(dtype: torch.dtype, n: int = 256, repeats: int = 3) -> float:
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return best


def _cpu_isa() -> str:
    """The instructions bf16 would run on here, as named in the reason printed."""
    cpu = getattr(torch, "cpu", None)
    names = [n for f, n in (("_is_amx_tile_supported", "AMX"), ("_is_avx512_bf16_supported", "AVX512-BF16"))
             if cpu is not None and getattr(cpu, f, lambda: False)()]
    capability = torch.backends.cpu.get_cpu_capability()
    if cpu is None or not getattr(cpu, "_is_avx2_supported", lambda: False)():
        return capability  # not an x86 CPU: its bf16 flags are not ones torch reports
    return f"{capability}, " + (" and ".join(names) if names else "no AVX512-BF16 or AMX")


@functools.cache
def cpu_native_bf16() -> tuple[bool, str]:
    """Whether this CPU runs bf16 matrix products natively, and why we think so."""
    forced = os.environ.get("MSF_NATIVE_BF16")
    if forced in ("0", "1"):
        return forced == "1", f"MSF_NATIVE_BF16={forced}"
    isa = _cpu_isa()
    cpu = getattr(torch, "cpu", None)
    x86 = cpu is not None and hasattr(cpu, "_is_avx512_bf16_supported") and cpu._is_avx2_supported()
    if x86:
        hardware = cpu._is_avx512_bf16_supported() or cpu._is_amx_tile_supported()
        if not hardware:
            return False, isa
        capped = (not torch.backends.cpu.get_cpu_capability().startswith("AVX512")
                  or os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("DNNL_MAX_CPU_ISA"))
        if not capped:
            return True, isa
    # the flags cannot tell: measure (256^3 products; well under a second even where bf16 is emulated)
    ratio = _matmul_seconds(torch.bfloat16) / _matmul_seconds(torch.float32)
    return ratio < 1.0, f"{isa}; bf16 products measured {ratio:.2g}x the time of fp32"


@functools.cache
def _cuda_native_bf16(index: int | None) -> tuple[bool, str]:
    ok = torch.cuda.is_bf16_supported()
    return ok, torch.cuda.get_device_name(index) + ("" if ok else " has no bf16")


def native_bf16(device: torch.device | str) -> tuple[bool, str]:
    """Whether ``device`` runs bf16 natively, and the reason, in words."""
    device = torch.device(device)
    if device.type == "cuda":
        return _cuda_native_bf16(device.index)
    if device.type == "cpu":
        return cpu_native_bf16()
    return False, f"{device.type} is not a device msf picks bf16 on"


def resolve_precision(precision: str, device: torch.device | str, *, what: str = "precision",
                      say: bool = True) -> str:
    """``precision`` with ``"auto"`` made concrete for ``device``: ``"bf16"`` where it runs natively,
    else ``"fp32"``. Other values are returned as they are (``"bf16-weights"`` too).

    ``what`` names the setting in the one line printed, once per process for each setting, device and
    answer (``say=False``: silent). An explicit bf16 value where bf16 is not native prints a warning.
    """
    dev = torch.device(device).type
    if precision != AUTO and not (precision in _BF16_VALUES and dev == "cpu"):
        return precision  # nothing to decide or warn about (autocast asks this at every step)
    native, why = native_bf16(device)
    if precision == AUTO:
        resolved = "bf16" if native else "fp32"
        if resolved == "bf16":
            reason = f"{why}: native bf16"
        elif dev == "cpu":
            reason = f"this CPU has no native bf16 ({why}); bf16 would run many times slower"
        else:
            reason = why
        _say_once(say, (what, dev, resolved), f"[msf] {what}: {resolved} ({reason})")
        return resolved
    if not native:
        _say_once(say, (what, dev, precision, "slow"),
                  f"[msf] warning: {what} {precision} on a CPU without native bf16 ({why}) runs emulated, "
                  f"50-140x slower than fp32 in our measurements; {what}=auto picks fp32 here")
    return precision


def _say_once(say: bool, key: tuple, line: str) -> None:
    if say and key not in _said:
        _said.add(key)
        print(line, file=sys.stderr, flush=True)
