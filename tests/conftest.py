"""Shared test helpers: named skip markers and a seeded random state.

Use the markers by importing them (pytest's default ``prepend`` import mode puts ``tests/`` on
``sys.path``, so this works from any test file; ``--import-mode=importlib`` would need
``pythonpath = ["tests"]`` in the pytest configuration)::

    from conftest import requires_cuda, requires_triton

    @requires_cuda
    def test_kernel_on_gpu(): ...

- ``requires_cuda``: a CUDA GPU is visible to torch.
- ``requires_triton``: triton imports and can run here: on a CUDA GPU, or on the CPU through the
  interpreter (``TRITON_INTERPRET=1``, which this module sets where no GPU is visible).
- ``requires_numba``: numba imports (the ``cpu-scalar`` baseline).
- ``requires_nvcc``: the CUDA compiler ``nvcc`` is on ``PATH``.

The ``seed`` fixture seeds torch's and numpy's global generators with 0 and returns the seed.
:func:`near_ties` builds int8 inputs on which float64 or reciprocal arithmetic gives other codes.
"""

from __future__ import annotations

import importlib.util
import os
import shutil

import numpy as np
import pytest
import torch


def _has(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


HAS_CUDA = torch.cuda.is_available()
# Without a GPU, Triton kernels run in the interpreter. Set here, before any test module imports
# kvpack: ``triton.jit`` reads the variable when a kernel is defined, so a module that imported
# kvpack's kernels first (test_cuda_decode.py run ahead of test_attention.py) left them compiled-mode.
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")
TRITON_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

requires_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
requires_triton = pytest.mark.skipif(
    not (_has("triton") and (HAS_CUDA or TRITON_INTERPRET)),
    reason="needs triton and a CUDA GPU (or TRITON_INTERPRET=1 to run kernels on the CPU)",
)
requires_numba = pytest.mark.skipif(not _has("numba"), reason="needs numba: pip install 'kvpack[cpu]'")
requires_nvcc = pytest.mark.skipif(
    shutil.which("nvcc") is None, reason="needs the CUDA compiler nvcc on PATH"
)


@pytest.fixture
def seed() -> int:
    """Seed torch and numpy with 0, so that a test's random inputs are the same on every run."""
    torch.manual_seed(0)
    np.random.seed(0)
    return 0


def rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """Relative L2 error of ``out`` against ``ref``, in float64."""
    return float((out.double() - ref.double()).norm() / ref.double().norm())


def assert_rows_match(out: torch.Tensor, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                      start: torch.Tensor | None, lengths: torch.Tensor | None, tolerance: float) -> None:
    """Each batch row of a padded decode ``out`` against float32 attention over that row's own tokens
    ``[start_b, lengths_b)`` of the dequantized ``keys``/``values``, its queries the last ``Lq``."""
    from kvpack import reference

    n, q_len = keys.shape[2], q.shape[2]
    for b in range(q.shape[0]):
        s = 0 if start is None else int(start[b])
        e = n if lengths is None else int(lengths[b])
        ref = reference.attention(q[b:b + 1], keys[b:b + 1, :, s:e], values[b:b + 1, :, s:e],
                                  causal_offset=e - s - q_len)
        assert rel_error(out[b:b + 1], ref) < tolerance, f"row {b}"


def near_ties(rows: int = 16, cols: int = 16, seed: int = 0) -> torch.Tensor:
    """A float32 ``[1, rows, cols]`` tensor on which only exact float32 int8 arithmetic gets the codes right.

    Row 0 and column 0 hold 1.0, so every channel and every token has ``max |x| = 1`` and the int8
    scale ``s = fl(1 / 127)``. The other elements lie within a few ulps of the code midpoints
    ``(k + 1/2) s``, chosen where ``rint(fl32(x / s))`` differs from ``rint`` of the exact (float64)
    quotient or of ``x * fl32(1 / s)``: a kernel that divides in float64, or multiplies by the
    reciprocal, gets some of these codes wrong.
    """
    s = np.float32(1.0) / np.float32(127.0)
    mids = ((np.arange(-127, 127) + 0.5) * np.float64(s)).astype(np.float32)
    cand = np.concatenate([mids + np.float32(d) * np.spacing(mids) for d in range(-3, 4)]).astype(np.float32)
    q32 = np.rint(cand / s)
    tricky = cand[
        (q32 != np.rint(cand.astype(np.float64) / np.float64(s))) | (q32 != np.rint(cand * (1 / s)))
    ]
    rng = np.random.default_rng(seed)
    x = np.ones((rows, cols), np.float32)
    x[1:, 1:] = rng.choice(tricky, size=(rows - 1, cols - 1))
    return torch.from_numpy(x)[None]
