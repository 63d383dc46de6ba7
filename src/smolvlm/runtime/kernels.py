"""The project's C++ kernels (src/smolvlm/csrc), compiled once with the machine's compiler.

    csrc/decode_step.cpp  one decoding step through all decoder layers (decode_step.py uses it)
    csrc/softmax.cpp      row softmax in place, bf16 (softmax_ below: attention at inference)
    csrc/attention.cpp    attention in one pass, bf16 (attention below: the vision tower's, and causal prompts')

torch.utils.cpp_extension builds them on first use (~1 min; cached in ~/.cache/torch_extensions; rebuilt when a
source changes). Without a C++ compiler `extension()` is None and every caller stays on its PyTorch path (same
results within bf16 rounding). `python -m smolvlm.runtime.kernels` builds them ahead of time (`make install` does).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

NAME = "smolvlm_kernels"
SOURCES = ["decode_step.cpp", "softmax.cpp", "attention.cpp"]  # decode_step.cpp holds the Python bindings

_MODULE = None  # the compiled extension; False once building it failed


def extension():
    """The compiled module, or None when it cannot be built here (no C++ compiler)."""
    global _MODULE
    if _MODULE is None:
        from torch.utils import cpp_extension

        sources = [str(Path(__file__).parent / "csrc" / name) for name in SOURCES]
        build_dir = Path(cpp_extension._get_build_directory(NAME, verbose=False))
        if not any(build_dir.glob("*.so")):
            print("smolvlm: compiling the C++ kernels (once, about a minute)...", file=sys.stderr)
        try:
            _MODULE = cpp_extension.load(name=NAME, sources=sources,
                                         # -fopenmp: at::parallel_for is compiled into these files; without it
                                         # their loops run on one thread
                                         extra_cflags=["-O3", "-march=native", "-fopenmp"],
                                         extra_ldflags=["-fopenmp"], verbose=False)
        except (OSError, RuntimeError, ImportError, SystemExit) as e:  # no compiler / ninja: stay eager
            print(f"smolvlm: the C++ kernels could not be built ({str(e).splitlines()[0][:200]}); "
                  "decoding and the vision tower run on PyTorch alone (slower)", file=sys.stderr)
            _MODULE = False
    return _MODULE or None


def softmax_(scores: torch.Tensor) -> torch.Tensor:
    """torch.softmax(scores, -1) of fresh bf16 scores (-inf where masked), in place by the C++ kernel where it is
    built (csrc/softmax.cpp: 2x ATen's here). Both accumulate in float32 and round once."""
    ext = extension()
    if ext is not None and ext.softmax_supported() and scores.dtype == torch.bfloat16 \
            and scores.is_contiguous():
        ext.softmax_bf16_(scores)
        return scores
    return torch.softmax(scores, dim=-1)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: torch.Tensor | None = None,
              causal: bool = False) -> torch.Tensor | None:
    """softmax(q k^T / sqrt(D)) v by csrc/attention.cpp: q (B, T, H, D), k and v (B, S, Hkv, D) bf16 with the last
    dimension contiguous (views of a fused qkv or of the KV cache are fine; query head h reads kv head
    h // (H / Hkv)); key_mask (B, S) bool (True = may be attended) or None; causal: query i sits at position
    S - T + i. Returns (B, T, H, D), or None where that kernel does not apply (not built, no AVX-512 BF16,
    D != 64, not bf16): the caller's PyTorch path then runs."""
    ext = extension()
    if ext is None or not (q.dtype == k.dtype == v.dtype == torch.bfloat16) \
            or not ext.attention_supported(q.shape[-1]) \
            or max(q.stride(-1), k.stride(-1), v.stride(-1)) != 1:
        return None
    return ext.attention_bf16(q, k, v, key_mask, causal, q.shape[-1] ** -0.5)


if __name__ == "__main__":  # `python -m smolvlm.runtime.kernels`: build them now (make install does), not at first use
    extension()  # without a compiler it says so and succeeds: everything runs on PyTorch alone
