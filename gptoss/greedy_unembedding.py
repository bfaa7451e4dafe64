"""Greedy tokens without the full unembedding, exactly, on CPU.

A decode step's largest matmul is the unembedding (vocabulary 201,088 x hidden), and a greedy row
without logprobs needs only its argmax. `GreedyUnembedding` keeps a 7-bit integer copy of the
unembedding (a quarter of float32's bytes, half of bfloat16's; 2.5x the multiply rate of float32 FMA
on AVX2) and screens the whole vocabulary with it (csrc/greedy_screen.c); a rigorous bound on the
screen's error (Cauchy-Schwarz on the quantization residuals of both sides, from per-row norms prepared
with the copy) rules out every row that cannot be the argmax, and the few candidates left are scored exactly
(products summed in double). In float32 the token is the argmax of the exact logits h.w_i, the lowest
index among equal ones: the full float32 GEMM's own argmax wherever its rounding (~1e-7 relative) does
not reorder the top rows. A bfloat16 unembedding's logits are bfloat16 (many ties at the top): there
the exact logits are rounded to bfloat16 and the lowest index among the largest wins, as over a
bfloat16 GEMM's logits, except where the GEMM's float32 sums round across a bfloat16 boundary.

Where the screen cannot decide a row (too many candidates: a zero or degenerate hidden state, or a
bound too wide for the logits' spread, as at hidden 2880 on random weights) it returns -1 and the
caller computes that row's logits the ordinary way; a screen that keeps failing stops trying.
"""

from __future__ import annotations

import ctypes
import logging

import torch

from gptoss import env, native

logger = logging.getLogger(__name__)

SOURCE = native.CSRC / "greedy_screen.c"
K_ALIGN = 64  # it reads 64 columns at a time
DTYPES = (torch.float32, torch.bfloat16)
GIVE_UP_AFTER = 8


def declare(lib: ctypes.CDLL) -> None:
    lib.greedy_screen_simd.restype = ctypes.c_int
    lib.greedy_screen.argtypes = [ctypes.c_void_p] * 6 + [ctypes.c_int, ctypes.c_void_p] + [ctypes.c_int64] * 4 + \
        [ctypes.c_void_p] * 2 + [ctypes.c_int]
    lib.greedy_screen.restype = ctypes.c_int
    lib.greedy_screen_prepare.argtypes = [ctypes.c_void_p, ctypes.c_int] + [ctypes.c_int64] * 3 + \
        [ctypes.c_void_p] * 5 + [ctypes.c_int]
    lib.greedy_screen_prepare.restype = None


KERNEL = native.Kernel(SOURCE, declare, "greedy rows use the full unembedding")


def library() -> ctypes.CDLL | None:
    """The compiled screen, built on first call; None (after one warning) where it cannot be built."""
    return KERNEL.library()


class GreedyUnembedding:
    """The argmax of `hidden @ weight.T` per row, screened (see the module). weight [V, K] float32 or
    bfloat16, on CPU."""

    def __init__(self, weight: torch.Tensor, lib: ctypes.CDLL | None = None):
        if weight.dtype not in DTYPES or weight.device.type != "cpu" or weight.dim() != 2:
            raise ValueError(f"GreedyUnembedding needs a float32 or bfloat16 CPU matrix, got {weight.dtype} "
                             f"{tuple(weight.shape)} on {weight.device}")
        self.lib = lib or library()
        if self.lib is None:
            raise RuntimeError(f"the greedy screen is not available: {KERNEL.failure}")
        self.weight = weight.contiguous()
        vocab, k = weight.shape
        self.padded = -(-k // K_ALIGN) * K_ALIGN
        self.quantized = torch.empty(vocab, self.padded, dtype=torch.int8)
        self.scale = torch.empty(vocab, dtype=torch.float32)
        self.rowsum = torch.empty(vocab, dtype=torch.int32)
        self.norm = torch.empty(vocab, dtype=torch.float64)  # doubles: see the kernel on scales and bounds
        self.error = torch.empty(vocab, dtype=torch.float64)
        self.lib.greedy_screen_prepare(self.weight.data_ptr(), int(weight.dtype == torch.bfloat16), vocab, k,
                                       self.padded, self.quantized.data_ptr(), self.scale.data_ptr(),
                                       self.rowsum.data_ptr(), self.norm.data_ptr(), self.error.data_ptr(),
                                       torch.get_num_threads())
        self.undecided_calls = 0  # calls in a row that left most of their rows undecided
        self.gave_up = False

    @staticmethod
    def copy_bytes(vocab_size: int, hidden_size: int) -> int:
        """The bytes of the screen's copy of a [vocab, hidden] unembedding: 7-bit codes padded to
        K_ALIGN columns, and per row a scale, a code sum and two norms."""
        return vocab_size * (-(-hidden_size // K_ALIGN) * K_ALIGN + 4 + 4 + 8 + 8)

    @property
    def nbytes(self) -> int:
        """What the copy holds now (0 once it gave up)."""
        return sum(t.nbytes for t in (self.quantized, self.scale, self.rowsum, self.norm, self.error))

    def give_up(self) -> None:
        """Stops screening for good and frees the copy (every row then takes the full unembedding)."""
        self.gave_up = True
        empty = torch.empty(0)
        self.quantized = self.scale = self.rowsum = self.norm = self.error = empty

    @classmethod
    def applies(cls, weight: torch.Tensor) -> bool:
        """Where the screen is worth building: a finite float32 or bfloat16 CPU unembedding on a CPU
        with the kernel's SIMD path (plain C is no faster than the GEMM), not turned off."""
        if not (env.greedy_screen_enabled() and weight.dtype in DTYPES and weight.device.type == "cpu"):
            return False
        lib = library()
        return lib is not None and lib.greedy_screen_simd() > 0 and bool(torch.isfinite(weight).all())

    def __call__(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """hidden [N, K] -> (tokens [N] long, -1 where undecided; candidates [N] int32, rows scored
        exactly). Rows holding NaN or inf are left undecided; so is every row once GIVE_UP_AFTER calls
        in a row have left most of theirs undecided (the screen's bound is too wide for this model's
        hidden states: it would only add its own time to the full unembedding's)."""
        n, k = hidden.shape
        if k != self.weight.shape[1]:
            raise ValueError(f"hidden {tuple(hidden.shape)} does not match the unembedding {tuple(self.weight.shape)}")
        h = hidden.float().contiguous()
        tokens = torch.full((n,), -1, dtype=torch.int64)
        candidates = torch.zeros(n, dtype=torch.int32)
        if self.gave_up:
            return tokens, candidates
        finite = torch.isfinite(h).all(dim=1)
        if not bool(finite.all()):
            rows = finite.nonzero().flatten()
            if len(rows):
                tokens[rows], candidates[rows] = self(h[rows])
            return tokens, candidates
        if n and self.lib.greedy_screen(
                self.quantized.data_ptr(), self.scale.data_ptr(), self.rowsum.data_ptr(), self.norm.data_ptr(),
                self.error.data_ptr(), self.weight.data_ptr(), int(self.weight.dtype == torch.bfloat16), h.data_ptr(),
                n, self.weight.shape[0], k, self.padded,
                tokens.data_ptr(), candidates.data_ptr(), torch.get_num_threads()) != 0:
            raise MemoryError("greedy screen: out of memory for its candidate pools")
        if n:
            self.undecided_calls = self.undecided_calls + 1 if int((tokens < 0).sum()) * 2 > n else 0
            if self.undecided_calls >= GIVE_UP_AFTER:
                self.give_up()
                logger.info("greedy screen: %d calls in a row left most rows undecided (its error bound is wide "
                            "next to these logits' spread); greedy rows take the full unembedding from now on, "
                            "and the screen's copy of the unembedding is freed", GIVE_UP_AFTER)
        return tokens, candidates
