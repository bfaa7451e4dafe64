"""The compiled CPU kernels an engine may use, loaded (prebuilt, or compiled) when a rank starts, before
its group reports healthy: the first request must not wait for a compiler (a 20b-shaped rank's first
chat took 35 s when the kernels were built inside it)."""

from __future__ import annotations

from engine import decode_attention
from gptoss import env, greedy_unembedding, mxfp4_linear

# The sources an image prebuilds (`gptoss-serve kernels --prebuild DIR`, deploy/Dockerfile).
KERNEL_SOURCES = (mxfp4_linear.SOURCE, greedy_unembedding.SOURCE, decode_attention.SOURCE)


def prepare_cpu_kernels(greedy_screen: bool = False) -> dict[str, str]:
    """Loads every kernel that is switched on; kernel name -> how it runs ("prebuilt x86-64-v3",
    "compiled -O3 -march=native ...", "fallback (...): why", or "off (...)": what turned it off).
    `greedy_screen`: the engine's opt-in (engine.greedy_screen)."""
    kernels = {
        "mxfp4_linear": (mxfp4_linear.KERNEL, env.mxfp4_kernel_enabled(), "GPTOSS_MXFP4_KERNEL=0"),
        "greedy_screen": (greedy_unembedding.KERNEL, greedy_screen and env.greedy_screen_enabled(),
                          "engine.greedy_screen false, or GPTOSS_GREEDY_SCREEN=0"),
        "decode_attention": (decode_attention.KERNEL, decode_attention.enabled(), "GPTOSS_DECODE_ATTENTION_KERNEL=0"),
    }
    return {name: kernel.status if on else f"off ({switch})" for name, (kernel, on, switch) in kernels.items()}
