"""The seed paper's logged run (Taneja and Shingvi, arXiv 2601.04719, their raw_results.txt).

Times are milliseconds, quantize + dequantize, float32 input; the CPU column is the authors'
single-threaded loop, which walks the row-major matrix column by column. The GPU is unnamed; its
vectorized quantize reached about 250 GB/s. The L2 column was summed in float32 and under-reports at
large sizes (the float64 value at 131072 x 8192 is about 74.5); the attention error used one random query.
"""

from __future__ import annotations

from dataclasses import dataclass

#: Memory bandwidth the paper's GPU reached (its vectorized quantize), for bandwidth fractions.
PAPER_GPU_GBPS = 250.0

#: The paper's kernel variants, as kvpack names its CUDA backends.
VARIANTS = ("naive", "tiled", "coarsened", "vectorized")


@dataclass(frozen=True)
class PaperRow:
    tokens: int
    channels: int
    cpu_ms: float
    naive_ms: float
    tiled_ms: float
    coarsened_ms: float
    vectorized_ms: float
    vectorized_quantize_ms: float
    vectorized_dequantize_ms: float
    l2_logged: float
    attention_error: float

    @property
    def config(self) -> str:
        return f"{self.tokens}x{self.channels}"

    def variant_ms(self, variant: str) -> float:
        """Quantize + dequantize time of one of :data:`VARIANTS`, or ``"cpu"``."""
        return getattr(self, f"{variant}_ms")


LOGGED: tuple[PaperRow, ...] = (
    PaperRow(1024, 64, 1.046, 0.024, 0.022, 0.022, 0.020, 0.011, 0.010, 0.5815, 0.00845),
    PaperRow(2048, 128, 4.463, 0.030, 0.032, 0.026, 0.025, 0.013, 0.012, 1.1635, 0.01213),
    PaperRow(16384, 256, 118.9, 0.271, 0.300, 0.234, 0.187, 0.087, 0.101, 4.647, 0.01657),
    PaperRow(65536, 256, 854.8, 1.258, 1.475, 0.935, 0.725, 0.324, 0.401, 9.212, 0.01690),
    PaperRow(131072, 256, 1711.0, 2.488, 1.915, 1.755, 1.459, 0.643, 0.816, 12.82, 0.01705),
    PaperRow(131072, 1024, 8613.0, 7.983, 6.925, 6.991, 5.764, 2.536, 3.228, 16.59, 0.03361),
    PaperRow(131072, 2048, 22573.0, 13.21, 13.97, 13.95, 11.55, 5.074, 6.479, 17.52, 0.04790),
    PaperRow(131072, 4096, 48919.0, 26.97, 30.08, 27.84, 23.16, 10.17, 12.99, 19.26, 0.06690),
    PaperRow(131072, 8192, 84115.0, 51.38, 58.09, 57.42, 46.91, 20.85, 26.06, 22.33, 0.09491),
    PaperRow(262144, 128, 1795.0, 2.472, 2.394, 1.743, 1.438, 0.640, 0.798, 12.82, 0.01169),
)

#: The eight configurations of the paper's evaluation (tokens, channels): ``kvpack bench``'s default.
CONFIGS: tuple[tuple[int, int], ...] = (
    (2048, 128),
    (16384, 256),
    (65536, 256),
    (131072, 256),
    (131072, 1024),
    (131072, 2048),
    (131072, 4096),
    (131072, 8192),
)

#: ``--large``: more than 2^31 elements, float16 (the paper's 32-bit indexing would overflow).
LARGE = (262144, 8192)


def lookup(tokens: int, channels: int) -> PaperRow | None:
    """The logged row of a configuration, if the paper ran it."""
    return next((r for r in LOGGED if (r.tokens, r.channels) == (tokens, channels)), None)


def roundtrip_bytes(tokens: int, channels: int) -> int:
    """The fewest bytes one float32 quantize + dequantize moves in the paper's setting (scales given):
    quantize reads 4 B/element and writes 1 B, dequantize reads 1 B and writes 4 B, plus the float32
    scales read once by each."""
    n = tokens * channels
    return 10 * n + 8 * channels


def gbps(row: PaperRow, variant: str) -> float:
    """The paper's quantize + dequantize rate of a variant, in GB/s (10^9 bytes per second)."""
    return roundtrip_bytes(row.tokens, row.channels) / (row.variant_ms(variant) / 1e3) / 1e9
