"""What this CPU can do, and what the runtime makes of it: one ISA level, one default dtype.

    level()           "generic" < "avx2" < "avx512" < "avx512_bf16" (x86); "generic" elsewhere (aarch64: NEON is
                      the baseline the compiler vectorizes for). The highest level whose instructions the CPU has,
                      lowered by SMOLVLM_CPU (to test or compare a lower path on a bigger CPU).
    native_bf16()     bf16 dot products in hardware (AVX512_BF16 / AMX-BF16): only there is bf16 compute faster
                      than float32. Elsewhere bf16 is emulated (Zen 3: ~10x slower training) and oneDNN's bf16
                      weight packing refuses to run.
    resolve_dtype()   "auto" -> bfloat16 where native_bf16(), else float32; other names as given.

The C++ kernels are compiled once per level (kernels.py), each with only its level's instructions, so a level
never runs on a CPU that lacks it. torch's own kernels follow ATEN_CPU_CAPABILITY and oneDNN's follow
ONEDNN_MAX_CPU_ISA (both read when torch starts); to imitate an AVX2-only CPU fully on a bigger one:
    SMOLVLM_CPU=avx2 ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 smolvlm ...
"""

from __future__ import annotations

import functools
import os
import platform

import torch

from smolvlm.errors import SmolVLMError

LEVELS = ("generic", "avx2", "avx512", "avx512_bf16")
ENV = "SMOLVLM_CPU"
# what each level needs, as /proc/cpuinfo spells the flags
LEVEL_FLAGS = {
    "avx2": {"avx2", "fma", "f16c"},
    "avx512": {"avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512dq"},
    "avx512_bf16": {"avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_bf16"},
}
# the flags worth reporting (doctor, bench); the rest of /proc/cpuinfo says nothing about our kernels
REPORTED = ("sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_bf16",
            "avx512_vnni", "avx_vnni", "avx_ne_convert", "amx_tile", "amx_bf16", "amx_int8",
            "asimd", "asimddp", "bf16", "i8mm", "sve", "sve2")
DTYPES = {
    "float32": torch.float32, "fp32": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16,
}


@functools.cache
def features() -> frozenset[str]:
    """The CPU's feature flags (x86 `flags`, aarch64 `Features` of /proc/cpuinfo), lower case. Only the line of this
    machine's architecture counts (under qemu-user emulation /proc/cpuinfo is the host's)."""
    wanted = "flags" if is_x86() else "Features"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == wanted:
                    return frozenset(value.split())
    except OSError:
        pass
    # no /proc (macOS, Windows): what torch's dispatcher found is the best we know
    cap = torch.backends.cpu.get_cpu_capability().lower()  # "DEFAULT", "AVX2", "AVX512", ...
    return frozenset(LEVEL_FLAGS.get(cap, set()))


def is_x86() -> bool:
    return platform.machine().lower() in ("x86_64", "amd64", "i686", "x86")


@functools.cache
def detected_level() -> str:
    """The highest level this CPU can run."""
    if not is_x86():
        return "generic"
    have = features()
    best = "generic"
    for name in LEVELS[1:]:
        if LEVEL_FLAGS[name] <= have:
            best = name
    return best


def forced_level() -> str | None:
    """SMOLVLM_CPU, checked; None when unset (or empty)."""
    value = os.environ.get(ENV, "").strip().lower()
    if not value:
        return None
    if value not in LEVELS:
        raise SmolVLMError(f"{ENV}={value!r} is not a level; choose one of {', '.join(LEVELS)}")
    return value


def level() -> str:
    """The level the runtime uses: the detected one, or the lower one SMOLVLM_CPU asks for."""
    detected, forced = detected_level(), forced_level()
    if forced is None:
        return detected
    if LEVELS.index(forced) > LEVELS.index(detected):
        missing = sorted(LEVEL_FLAGS[forced] - features())
        raise SmolVLMError(f"{ENV}={forced} asks for instructions this CPU lacks ({', '.join(missing)}); "
                           f"the highest level here is {detected}")
    return forced


def at_least(name: str) -> bool:
    return LEVELS.index(level()) >= LEVELS.index(name)


def native_bf16() -> bool:
    """bf16 matmuls run in hardware here (and within the forced level)."""
    return at_least("avx512_bf16")


def resolve_dtype(name: str | torch.dtype | None) -> torch.dtype:
    """A dtype name ("auto", "float32", "bfloat16", "float16" and their short forms) -> torch.dtype."""
    if isinstance(name, torch.dtype):
        return name
    if name is None or name == "auto":
        return torch.bfloat16 if native_bf16() else torch.float32
    if name not in DTYPES:
        raise SmolVLMError(f"unknown dtype {name!r}; choose auto, float32, bfloat16 or float16")
    return DTYPES[name]


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def describe_dtype(name: str | torch.dtype | None) -> str:
    """What a --dtype choice resolves to, with the reason when it was "auto" (for --json and bench)."""
    resolved = dtype_name(resolve_dtype(name))
    if name in (None, "auto"):
        why = "native bf16 dot products" if native_bf16() else "no native bf16 on this CPU (level " + level() + ")"
        return f"{resolved} (auto: {why})"
    return resolved


def model_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() in ("model name", "Model", "CPU part"):
                    return value.strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def summary() -> dict:
    """The facts `smolvlm doctor`, `bench` and --json outputs report."""
    forced = os.environ.get(ENV) or None
    return {
        "cpu": model_name(),
        "arch": platform.machine(),
        "cores": os.cpu_count(),
        "features": [f for f in REPORTED if f in features()],
        "level_detected": detected_level(),
        "level": level(),
        "level_forced": forced,
        "dtype_auto": dtype_name(resolve_dtype("auto")),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "aten_capability": torch.backends.cpu.get_cpu_capability(),
    }
