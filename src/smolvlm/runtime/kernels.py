"""The project's C++ kernels (src/smolvlm/runtime/csrc), compiled with the machine's compiler once per ISA level.

    csrc/decode_step.cpp  one decoding step through all decoder layers (decode_step.py uses it); the bindings
    csrc/gemv.cpp         the step's projections: few-row matmuls streaming bf16 / float32 / int8 / int4 weights
    csrc/softmax.cpp      row softmax in place, bf16 / float32 (runtime/attention.py)
    csrc/attention.cpp    attention in one pass, bf16 (runtime/attention.py: the vision tower's and causal
                          prompts'); csrc/attention_f32.cpp the same in float32

Each level of cpu.py (generic, avx2, avx512, avx512_bf16) is its own module, `smolvlm_kernels_<level>`, built
with only that level's instructions (LEVEL_FLAGS; never -march=native), so the build cache (torch_extensions,
keyed by the name) cannot hand a CPU a build it cannot run. `extension()` loads the level cpu.level() picks
(SMOLVLM_CPU lowers it); `extension(level)` any level this CPU can run (tests compare them).

torch.utils.cpp_extension builds a level on first use (~1 min; cached in ~/.cache/torch_extensions; rebuilt when a
source changes). Without a C++ compiler `extension()` is None and every caller stays on its PyTorch path (same
results within rounding). `python -m smolvlm.runtime.kernels [--level L ...|all]` builds ahead of time
(`make install` builds this CPU's level).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import os
import subprocess
import sys
from pathlib import Path

from smolvlm.errors import SmolVLMError
from smolvlm.runtime import cpu

NAME = "smolvlm_kernels"
CSRC = Path(__file__).parent / "csrc"
_AVX2 = ["-mavx2", "-mfma", "-mf16c"]
_AVX512 = _AVX2 + ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq"]
LEVEL_FLAGS = {"generic": [], "avx2": _AVX2, "avx512": _AVX512, "avx512_bf16": _AVX512 + ["-mavx512bf16"]}
# -fopenmp: at::parallel_for is compiled into these files; without it their loops run on one thread
COMMON_FLAGS = ["-O3", "-fopenmp"]

_MODULES: dict[str, object] = {}  # level -> the compiled module, or False once building it failed
_ERRORS: dict[str, str] = {}  # level -> why it could not be built


def sources() -> list[str]:
    return [str(p) for p in sorted(CSRC.glob("*.cpp"))]


def sources_digest(level: str) -> str:
    """A hash of what a build of `level` is made from (the sources, the headers, the flags): torch rebuilds when
    these change, and a stamp of this beside the build tells ahead of time that it will (so the user is told)."""
    h = hashlib.sha256(" ".join(COMMON_FLAGS + LEVEL_FLAGS[level]).encode())
    for path in sorted(CSRC.glob("*")):
        h.update(path.name.encode() + path.read_bytes())
    return h.hexdigest()


def stamp_file(level: str) -> Path:
    return build_dir(level) / "smolvlm-sources.sha256"


def module_name(level: str) -> str:
    return f"{NAME}_{level}"


def build_dir(level: str) -> Path:
    from torch.utils import cpp_extension

    return Path(cpp_extension._get_build_directory(module_name(level), verbose=False))


def runnable_levels() -> list[str]:
    """The levels this CPU can run, lowest first."""
    detected = cpu.LEVELS.index(cpu.detected_level())
    return list(cpu.LEVELS[: detected + 1])


def check_level(level: str) -> str:
    if level not in cpu.LEVELS:
        raise SmolVLMError(f"unknown CPU level {level!r}; choose one of {', '.join(cpu.LEVELS)}")
    if level not in runnable_levels():
        raise SmolVLMError(f"this CPU cannot run level {level} (the highest here is {cpu.detected_level()})")
    return level


def extension(level: str | None = None):
    """The compiled module of `level` (default: cpu.level()), or None when it cannot be built here (no C++
    compiler: one notice, then every caller runs on PyTorch). A level this CPU lacks is a SmolVLMError."""
    level = check_level(level or cpu.level())
    if level not in _MODULES:
        from torch.utils import cpp_extension

        name = module_name(level)
        digest, stamp = sources_digest(level), stamp_file(level)
        if not any(build_dir(level).glob("*.so")):
            print(f"smolvlm: compiling the C++ kernels for {level} (once, about a minute)...", file=sys.stderr)
        elif not stamp.exists() or stamp.read_text().strip() != digest:  # torch rebuilds a build of other sources
            print(f"smolvlm: the C++ kernels for {level} may be out of date: compiling them again if so (about a "
                  "minute)...", file=sys.stderr)
        try:
            with build_lock(level), our_ninja_first():
                _MODULES[level] = cpp_extension.load(name=name, sources=sources(),
                                                     extra_cflags=COMMON_FLAGS + LEVEL_FLAGS[level],
                                                     extra_ldflags=["-fopenmp"], verbose=False)
                stamp.write_text(digest + "\n")
        except (OSError, RuntimeError, ImportError, SystemExit, subprocess.SubprocessError) as e:  # no compiler
            _ERRORS[level] = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
            print(f"smolvlm: the C++ kernels could not be built ({_ERRORS[level]}); "
                  "decoding and the vision tower run on PyTorch alone (slower)", file=sys.stderr)
            _MODULES[level] = False
    return _MODULES[level] or None


@contextlib.contextmanager
def our_ninja_first():
    """PATH with the `ninja` package's program first while torch builds. Two ninja versions (e.g. a system 1.11 and
    the package's 1.13) do not read each other's build logs: each takes the other's builds for changed commands and
    rebuilds every file (a minute, without a word), so which one runs must not depend on the caller's PATH."""
    try:
        import ninja

        first = ninja.BIN_DIR
    except (ImportError, AttributeError):  # no ninja package: torch finds whatever ninja PATH has
        yield
        return
    before = os.environ.get("PATH")
    os.environ["PATH"] = first + os.pathsep + (before or "")
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("PATH", None)
        else:
            os.environ["PATH"] = before


@contextlib.contextmanager
def build_lock(level: str):
    """Hold an flock beside the level's build folder while torch builds or loads it. torch's own lock is a file it
    deletes when done, so a build that was killed (Ctrl-C during the first compile) leaves it behind and every later
    load waits on it forever; an flock dies with its process. Holding ours, no other smolvlm process is building
    this level, so a torch lock file still there is such a leftover and is removed."""
    try:
        import fcntl
    except ImportError:  # not POSIX: torch's lock alone
        yield
        return
    folder = build_dir(level)
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder.parent / f"{module_name(level)}.flock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            (folder / "lock").unlink(missing_ok=True)
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def compiler_version() -> str | None:
    """The first line of `c++ --version`, or None without a compiler."""
    try:
        out = subprocess.run(["c++", "--version"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.splitlines()[0] if out.returncode == 0 and out.stdout else None


def status() -> dict:
    """What `smolvlm doctor` reports about the kernels: the level, whether its module is built (without building
    it) and why not, the compiler, the build directory."""
    try:
        level = cpu.level()
    except SmolVLMError as e:
        return {"level": None, "built": False, "reason": str(e), "compiler": compiler_version(), "build_dir": None}
    folder = build_dir(level)
    loaded = _MODULES.get(level)
    built = bool(loaded) or any(folder.glob("*.so"))
    compiler = compiler_version()
    if built:
        reason = None
    elif level in _ERRORS:
        reason = _ERRORS[level]
    elif compiler is None:
        reason = "no C++ compiler (c++): decoding and the vision tower run on PyTorch alone"
    else:
        reason = "not built yet: the first use builds it (or python -m smolvlm.runtime.kernels)"
    return {"level": level, "module": module_name(level), "built": built, "loaded": bool(loaded), "reason": reason,
            "compiler": compiler, "build_dir": str(folder)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m smolvlm.runtime.kernels",
                                description="Build the C++ kernels now (not at first use).")
    p.add_argument("--level", action="append", metavar="L",
                   help=f"a level to build ({', '.join(cpu.LEVELS)}), repeatable, or 'all' (every level this CPU "
                        "can run); default: this CPU's level")
    args = p.parse_args(argv)
    try:
        levels = [None] if not args.level else \
            runnable_levels() if "all" in args.level else [check_level(x) for x in args.level]
        for level in levels:
            ext = extension(level)  # without a compiler it says so and succeeds: everything runs on PyTorch
            if ext is not None:
                print(f"smolvlm: C++ kernels built for {ext.level()} ({build_dir(ext.level())})", file=sys.stderr)
    except SmolVLMError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
