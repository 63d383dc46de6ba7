"""Building and loading the C++ kernels: one module per ISA level, and a killed build never blocks later runs."""

import subprocess
import sys

from smolvlm.runtime import cpu, kernels


def test_a_lock_left_by_a_killed_build_does_not_hang_the_next_run():
    level = cpu.level()
    kernels.extension(level)  # built (or found built) first, so the subprocess below only loads
    folder = kernels.build_dir(level)
    (folder / "lock").touch()  # what torch leaves behind when its build is killed mid-way
    code = f"from smolvlm.runtime import kernels; assert kernels.extension({level!r}) is not None"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert not (folder / "lock").exists()


def test_each_level_is_its_own_module_built_without_march_native():
    for level in cpu.LEVELS:
        assert kernels.module_name(level).endswith(level)
        assert "-march=native" not in kernels.COMMON_FLAGS + kernels.LEVEL_FLAGS[level]
    assert kernels.LEVEL_FLAGS["generic"] == []
    assert "-mavx512bf16" in kernels.LEVEL_FLAGS["avx512_bf16"] and "-mavx512f" not in kernels.LEVEL_FLAGS["avx2"]


def test_a_build_of_other_sources_is_announced_before_torch_rebuilds_it():
    """torch rebuilds silently (about a minute) when a source changed since the build; the stamp beside the build
    lets extension() say so first. An up-to-date build loads without a word."""
    level = cpu.level()
    kernels.extension(level)
    stamp = kernels.stamp_file(level)
    assert stamp.read_text().strip() == kernels.sources_digest(level)
    code = f"from smolvlm.runtime import kernels; assert kernels.extension({level!r}) is not None"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "compiling" not in r.stderr, r.stderr
    stamp.write_text("a build of other sources\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert f"the C++ kernels for {level} may be out of date" in r.stderr
    assert stamp.read_text().strip() == kernels.sources_digest(level)  # stamped again once loaded


def test_builds_run_the_ninja_package_whatever_path_the_caller_has(monkeypatch):
    """A system ninja of another version takes the package's builds for changed commands and rebuilds them all."""
    import os
    import shutil
    from pathlib import Path

    import ninja

    monkeypatch.setenv("PATH", "/usr/bin:/bin")  # where a system ninja would be found first
    with kernels.our_ninja_first():
        assert Path(shutil.which("ninja")).parent == Path(ninja.BIN_DIR)
    assert os.environ["PATH"] == "/usr/bin:/bin"
