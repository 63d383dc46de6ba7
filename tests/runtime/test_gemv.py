"""The C++ projections (csrc/gemv.cpp) at every ISA level this CPU can run: each weight kind (dense float32,
dense bf16, int8, int4) with float32 and bf16 activations against a float32 PyTorch product of the dequantized
weights (built here from the integers and scales, not by the kernels); the 8-bit-activation kinds (csrc/gemv_q8.cpp)
against the same sums built in PyTorch; the per-level modules (kernels.py)."""

import pytest
import torch

from conftest import as_two_int8s, skip_above_ceiling
from smolvlm.errors import SmolVLMError
from smolvlm.runtime import cpu, kernels


def ext_at(level: str):
    """That level's module; a level this CPU lacks is skipped (with why), never failed."""
    skip_above_ceiling(level)
    ext = kernels.extension(level)
    assert ext is not None, f"the {level} kernels were not built: {kernels.status()}"
    assert ext.level() == level  # the module holds that level's code (common.h's SMOLVLM_LEVEL)
    return ext


def weights(kind: str, n: int, k: int, scale_dtype: torch.dtype, group: int, g: torch.Generator):
    """(project's arguments, the dequantized weight (N, K) float32 made in plain PyTorch)."""
    if kind in ("f32", "bf16"):
        w = torch.randn(n, k, generator=g).to(torch.float32 if kind == "f32" else torch.bfloat16)
        return (0, w, torch.empty(0), 0), w.float()
    if kind == "int8":
        q = torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8)
        s = (torch.rand(n, generator=g) + 0.5).to(scale_dtype)
        return (1, q, s, 0), q.float() * s.float()[:, None]
    packed = torch.randint(0, 256, (n, k // 2), generator=g, dtype=torch.uint8)
    sz = torch.randn(n, k // group, 2, generator=g).to(scale_dtype)  # (scale, zero) per group
    q = torch.empty(n, k)
    q[:, 0::2], q[:, 1::2] = (packed & 15).float(), (packed >> 4).float()  # even input: low nibble
    w = (q.view(n, k // group, group) - 8) * sz[..., :1].float() + sz[..., 1:].float()
    return (2, packed, sz, group), w.view(n, k)


SHAPES = [(1, 64, 40, 32), (3, 96, 7, 32), (16, 256, 36, 64), (2, 96, 8, 6), (17, 64, 12, 32), (1, 1536, 576, 32)]


@pytest.mark.parametrize("level", cpu.LEVELS)
@pytest.mark.parametrize("kind", ["f32", "bf16", "int8", "int4"])
@pytest.mark.parametrize("act", [torch.float32, torch.bfloat16], ids=["x_f32", "x_bf16"])
def test_projection_matches_the_dequantized_product(level, kind, act):
    """B <= 16: the level's streaming kernel (4-row blocks and a remainder, K not a multiple of the vector, int4
    groups the vectors do not divide); B = 17: the many-rows path. Output in x's dtype."""
    ext = ext_at(level)
    for b, k, n, group in SHAPES:
        for scale_dtype in (torch.float32, torch.bfloat16):
            g = torch.Generator().manual_seed(b * 1000 + k + n + group)
            args, w = weights(kind, n, k, scale_dtype, group, g)
            x = torch.randn(b, k, generator=g).to(act)
            out = ext.project(x, *args)
            assert out.dtype == act and out.shape == (b, n)
            exact = x.float() @ w.t()
            if act == torch.float32:  # fp32 sums in another order only
                tol = 1e-5 * (x.float().abs() @ w.abs().t())
            else:  # one bf16 rounding of each output, plus the fp32 sums
                tol = exact.abs() * 2**-8 + 1e-3 * exact.abs().max()
            bad = (out.float() - exact).abs() > tol
            assert not bad.any(), (b, k, n, group, scale_dtype, (out.float() - exact).abs().max())


@pytest.mark.parametrize("level", cpu.LEVELS)
def test_generic_and_level_paths_agree(level):
    """Every module also holds the plain C++ path: the level's vector code must match it closely."""
    ext = ext_at(level)
    g = torch.Generator().manual_seed(5)
    for kind in ("f32", "bf16", "int8", "int4"):
        args, _ = weights(kind, 24, 128, torch.bfloat16, 32, g)
        x = torch.randn(2, 128, generator=g)
        a, b = ext.project(x, *args), ext.project_generic(x, *args)
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-4 * b.abs().max().item()), kind


Q8_SHAPES = [(1, 576, 40, 32), (3, 128, 7, 64), (16, 1536, 36, 32), (2, 64, 5, 32), (1, 96, 8, 32), (1, 72, 4, 6)]


@pytest.mark.parametrize("level", cpu.LEVELS)
@pytest.mark.parametrize("storage", ["int8", "int4"])
@pytest.mark.parametrize("act", [torch.float32, torch.bfloat16], ids=["x_f32", "x_bf16"])
def test_integer_activation_kinds_match_their_sums_built_in_pytorch(level, storage, act):
    """Kinds 5 / 4: int8 / int4 storage times x held as two int8s per input (q1 + q2 / 254 steps of max|x| / 127
    per block of 32; int4's zero points on the exact sums of x). Where K or the group does not fit (int4: K % 64,
    g % 32; int8: K % 32) they are kinds 1 / 2 exactly. The level's vector code and the plain loops
    (project_generic) give the same sums up to float order."""
    ext = ext_at(level)
    kind, base = (5, 1) if storage == "int8" else (4, 2)
    for b, k, n, group in Q8_SHAPES:
        for scale_dtype in (torch.float32, torch.bfloat16):
            g = torch.Generator().manual_seed(b * 1000 + k + n + group)
            args, w = weights(storage, n, k, scale_dtype, group, g)
            x = torch.randn(b, k, generator=g).to(act)
            out = ext.project(x, kind, *args[1:])
            assert out.dtype == act and out.shape == (b, n)
            fits = k % 32 == 0 if storage == "int8" else k % 64 == 0 and group % 32 == 0
            if not fits:
                assert torch.equal(out, ext.project(x, base, *args[1:])), (b, k, n, group)
                continue
            xf = x.float()
            if storage == "int8":
                scaled = w  # the part of W that meets the integer x
                sums = as_two_int8s(xf) @ w.t()
            else:  # W = q * s + (z - 8 s): the q * s part on the rounded x, the rest on x itself
                packed, sz = args[1], args[2].float()
                q = torch.empty(n, k)
                q[:, 0::2], q[:, 1::2] = (packed & 15).float(), (packed >> 4).float()
                qs = (q.view(n, k // group, group) * sz[..., :1]).view(n, k)
                rest = (sz[..., 1:] - 8 * sz[..., :1]).expand(n, k // group, group).reshape(n, k)
                scaled = qs
                sums = as_two_int8s(xf) @ qs.t() + xf @ rest.t()
            tol = 1e-5 * (xf.abs() @ w.abs().t()) + (0 if act == torch.float32 else sums.abs() * 2**-8)
            for got in (out, ext.project_generic(x, kind, *args[1:])):
                bad = (got.float() - sums).abs() > tol
                assert not bad.any(), (b, k, n, group, scale_dtype, (got.float() - sums).abs().max())
            # and the rounding costs at most half a step of q2 per input: sum_k |W| d / 254 / 2
            step = (xf.abs().view(b, k // 32, 32).amax(-1) / 127 / 254).repeat_interleave(32, -1)
            bound = (step / 2) @ scaled.abs().t() + tol
            assert ((out.float() - xf @ w.t()).abs() <= bound * 1.001).all()


def test_bad_arguments_are_refused():
    ext = kernels.extension()
    x = torch.randn(1, 64)
    with pytest.raises(RuntimeError, match="int4 scale"):
        ext.project(x, 2, torch.zeros(8, 32, dtype=torch.uint8), torch.zeros(8, 2), 32)
    with pytest.raises(RuntimeError, match="does not match"):
        ext.project(x, 0, torch.zeros(8, 32), torch.empty(0), 0)
    with pytest.raises(RuntimeError, match="unknown kind"):
        ext.project(x, 7, torch.zeros(8, 64), torch.empty(0), 0)
    with pytest.raises(RuntimeError, match="int8 weight must be"):
        ext.project(x, 5, torch.zeros(8, 64), torch.ones(8), 0)
    with pytest.raises(RuntimeError, match="bfloat16 or float32"):
        ext.project(x.half(), 0, torch.zeros(8, 64), torch.empty(0), 0)


def test_this_cpus_level_is_built_and_smolvlm_cpu_lowers_it(monkeypatch):
    ext = kernels.extension()
    assert ext is not None, f"no C++ kernels for {cpu.level()}: {kernels.status()}"
    assert ext.level() == cpu.level()
    assert kernels.status()["built"] and kernels.status()["level"] == cpu.level()
    monkeypatch.setenv("SMOLVLM_CPU", "generic")
    assert kernels.extension().level() == "generic"
    assert kernels.status()["module"] == "smolvlm_kernels_generic"


def test_a_level_the_cpu_lacks_is_refused(monkeypatch, capsys):
    monkeypatch.setattr(cpu, "detected_level", lambda: "avx2")
    with pytest.raises(SmolVLMError, match="cannot run level avx512"):
        kernels.extension("avx512")
    assert kernels.main(["--level", "avx512_bf16"]) == 2
    assert kernels.main(["--level", "sse9"]) == 2
    err = capsys.readouterr().err
    assert "unknown CPU level 'sse9'" in err and "Traceback" not in err


def test_each_level_builds_with_only_its_flags():
    assert kernels.LEVEL_FLAGS["generic"] == []
    for level in cpu.LEVELS:
        flags = kernels.COMMON_FLAGS + kernels.LEVEL_FLAGS[level]
        assert "-march=native" not in flags and "-fopenmp" in flags
        assert ("-mavx512bf16" in flags) == (level == "avx512_bf16")
        assert ("-mavx2" in flags) == (level != "generic")
        assert kernels.module_name(level) == f"smolvlm_kernels_{level}"


def test_aten_int4_kind_matches_the_portable_one():
    """Kind 3 (ATen's int4 layout, bf16 activations where bf16 is native) gives kind 2's product; bad inputs fail."""
    from smolvlm.runtime.quantize import aten_int4, aten_int4_applies

    ext = kernels.extension()
    g = torch.Generator().manual_seed(7)
    (_, packed, sz, group), w = weights("int4", 64, 128, torch.bfloat16, 32, g)
    if not aten_int4_applies(torch.bfloat16, sz):
        pytest.skip(f"ATen's int4 kernel is used only with native bf16 (this CPU's level: {cpu.level()})")
    x = torch.randn(3, 128, generator=g).to(torch.bfloat16)
    a_packed, a_sz = aten_int4(packed, sz, {})
    out = ext.project(x, 3, a_packed, a_sz, group)
    exact = x.float() @ w.t()
    assert out.dtype == torch.bfloat16
    assert ((out.float() - exact).abs() <= exact.abs() * 2**-7 + 1e-2 * exact.abs().max()).all()
    with pytest.raises(RuntimeError, match="ATen-packed int4 takes bfloat16 x"):
        ext.project(x.float(), 3, a_packed, a_sz, group)
