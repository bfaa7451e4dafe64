"""The gpt-oss network in PyTorch, device-agnostic, float32 or bfloat16.

Module and attribute names equal the HF checkpoint's tensor names (minus the `model.` prefix), so the
loader maps names one to one. There is one forward pass for every caller: where attention keeps its
keys and values is an `AttentionContext` passed in (the reference's contiguous `KVCache`, or the
engine's paged cache), and the expert-parallel layer replaces each block's `mlp` with a module of the
same call.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from gptoss import mxfp4, mxfp4_linear
from gptoss.config import ModelConfig, yarn_concentration
from gptoss.greedy_unembedding import GreedyUnembedding


def _find_onednn_linear():
    try:
        return torch.ops.mkldnn._linear_pointwise if torch.backends.mkldnn.is_available() else None
    except (AttributeError, RuntimeError):
        return None


def _onednn_bf16_supported() -> bool:
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


_ONEDNN_LINEAR = _find_onednn_linear()
# Up to this many tokens per expert, packed experts run the MXFP4 kernel; beyond it, dequantizing each
# expert (one compiled pass) and running a GEMM is faster. Measured on 2 cores at gpt-oss-20b's expert
# shapes: on AVX-512 (Zen 4), oneDNN's bf16 GEMM overtakes the kernel at ~16 tokens, its float32 GEMM
# (weights reordered per call) only beyond 128; on AVX2 (Zen 3) the float32 GEMM at ~64 tokens, and a
# bf16 GEMM without bf16 hardware is 4x slower than the kernel up to 128 tokens at least.
_AVX512 = torch.backends.cpu.get_cpu_capability().startswith("AVX512")
MXFP4_KERNEL_MAX_TOKENS = {torch.float32: 128 if _AVX512 else 64,
                           torch.bfloat16: 16 if _onednn_bf16_supported() else 128}


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`F.linear`. float32 on CPU goes through oneDNN, which uses the CPU's widest vector unit where
    MKL's sgemm may not: about 2x faster on AVX-512 AMD CPUs at MoE and unembedding shapes."""
    if _ONEDNN_LINEAR is not None and x.dtype == weight.dtype == torch.float32 and x.device.type == "cpu":
        return _ONEDNN_LINEAR(x, weight, bias, "none", [], "")
    return F.linear(x, weight, bias)


def unembedding_copy_bytes(config: ModelConfig, dtype: torch.dtype, device: str | torch.device,
                           greedy_screen: bool) -> int:
    """What serving on `device` keeps of the unembedding besides the model's own weight: the prepacked
    copy (`Transformer.prepack_unembedding`, the unembedding's bytes again) and, when `greedy_screen`,
    the screen's 7-bit copy (`prepare_greedy_unembedding`), each where it applies. A load for serving
    counts them (`load_model(reserve_bytes=)`): at gpt-oss's 201,088 x 2880 they are 2.3 GB in float32
    (1.2 GB in bfloat16) and 0.59 GB."""
    if torch.device(device).type != "cpu":
        return 0
    probe = torch.zeros(1, 1, dtype=dtype)  # what the copies apply to depends on the dtype and the CPU only
    total = 0
    if PrepackedLinearWeight.supports(probe):
        total += config.vocab_size * config.hidden_size * dtype.itemsize
    if greedy_screen and GreedyUnembedding.applies(probe):
        total += GreedyUnembedding.copy_bytes(config.vocab_size, config.hidden_size)
    return total


class PrepackedLinearWeight:
    """A CPU weight kept a second time in oneDNN's blocked layout: oneDNN then skips reordering the
    weight on every call (the unembedding here: float32 ~30% faster at 8-32 rows; bfloat16 ~2x at
    1 row, ~1.5x at 32). The result is bit for bit `linear`'s, except for a single float32 row, whose
    plain GEMV path rounds differently (and is as fast): that row keeps the plain weight."""

    def __init__(self, weight: torch.Tensor, batch_size_hint: int = 32):
        self.weight = weight
        self.packed = torch.ops.mkldnn._reorder_linear_weight(weight, batch_size_hint)
        self.min_rows = 2 if weight.dtype == torch.float32 else 0

    @staticmethod
    def supports(weight: torch.Tensor) -> bool:
        if not (_ONEDNN_LINEAR is not None and weight.device.type == "cpu"
                and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")):
            return False
        if weight.dtype == torch.bfloat16:
            # oneDNN reorders bf16 weights only on CPUs with AVX-512 BW/VL/DQ or AVX-NE-CONVERT.
            return _onednn_bf16_supported()
        return weight.dtype == torch.float32

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] < self.min_rows:
            return linear(x, self.weight)
        return _ONEDNN_LINEAR(x, self.packed, None, "none", [], "")


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float, dtype: torch.dtype | None = None, device=None):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(size, dtype=dtype, device=device), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Always in float32, whatever the model dtype.
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (xf * self.weight.float()).to(x.dtype)


def yarn_inv_freq(config: ModelConfig) -> torch.Tensor:
    """YaRN inverse frequencies [head_dim / 2], float64 math for the table."""
    d = config.head_dim
    base, factor, ctx = config.rope_theta, config.rope_scaling_factor, config.rope_original_context
    freq = base ** (torch.arange(0, d, 2, dtype=torch.float64) / d)

    # The ramp bounds stay unrounded: flooring/ceiling them was a real bug in two serving engines.
    def bound(beta: float) -> float:
        return d / 2 * math.log(ctx / (beta * 2 * math.pi)) / math.log(base)

    low, high = bound(config.rope_beta_fast), bound(config.rope_beta_slow)
    ramp = ((torch.arange(d // 2, dtype=torch.float64) - low) / (high - low)).clamp(0, 1)
    mask = 1 - ramp
    return (1 / (factor * freq)) * (1 - mask) + (1 / freq) * mask


class RotaryEmbedding(nn.Module):
    """Half-split (NeoX) RoPE with YaRN; cos and sin both carry the concentration 0.1*ln(factor)+1."""

    def __init__(self, config: ModelConfig, device=None):
        super().__init__()
        self.register_buffer("inv_freq", yarn_inv_freq(config).float().to(device), persistent=False)
        self.concentration = yarn_concentration(config.rope_scaling_factor)

    def cos_sin(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [T] -> cos, sin [T, head_dim / 2] in float32."""
        angles = positions.to(self.inv_freq.device).float()[:, None] * self.inv_freq[None, :]
        return torch.cos(angles) * self.concentration, torch.sin(angles) * self.concentration


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [T, heads, head_dim]; cos, sin [T, head_dim / 2]."""
    x1, x2 = x.float().chunk(2, dim=-1)
    cos, sin = cos[:, None, :], sin[:, None, :]
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(x.dtype)


def attention_mask(q_positions: torch.Tensor, k_positions: torch.Tensor, window: int | None) -> torch.Tensor:
    """[T, S] bool: causal, and with a window query i sees keys j with i - window < j <= i."""
    diff = q_positions[:, None] - k_positions[None, :]
    allowed = diff >= 0
    if window is not None:
        allowed &= diff < window
    return allowed


def sink_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sinks: torch.Tensor,
                   mask: torch.Tensor, scale: float) -> torch.Tensor:
    """Eager attention with sinks and GQA.

    q [T, Hq, D]; k, v [S, Hkv, D]; sinks [Hq]; mask [T, S] bool -> [T, Hq * D].
    The sink is an extra softmax column per head that is dropped afterwards: it only adds exp(sink)
    to the denominator.
    """
    t, hq, d = q.shape
    hkv = k.shape[1]
    qg = q.view(t, hkv, hq // hkv, d).float()
    scores = torch.einsum("tgqd,sgd->gqts", qg, k.float()) * scale  # [Hkv, Q/KV, T, S]
    scores = scores.masked_fill(~mask, float("-inf"))
    sink_col = sinks.float().view(hkv, hq // hkv, 1, 1).expand(hkv, hq // hkv, t, 1)
    probs = torch.softmax(torch.cat((scores, sink_col), dim=-1), dim=-1)[..., :-1]
    out = torch.einsum("gqts,sgd->tgqd", probs, v.float())
    return out.reshape(t, hq * d).to(q.dtype)


class AttentionContext(Protocol):
    """Where one forward pass's attention stores and reads keys and values.

    The model does the same math whatever the cache layout; the context owns the layout and the
    attention over it: `KVCache` (contiguous, one sequence) for the reference path, a paged cache for
    a batch of sequences in the engine (engine/attention.py).
    """

    def positions(self, num_tokens: int) -> torch.Tensor:
        """[num_tokens] long on the model's device: the positions of the pass's new tokens."""
        ...

    def attend(self, attn: Attention, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Stores the new tokens' k, v for layer `attn.layer` and attends q over every key each query
        sees (causal, within `attn.window`, with `attn.sinks`, scaled by `attn.scale`).

        Args:
            attn: the calling layer's module: its index, window, sinks and scale.
            q: [T, Hq, D]; k, v: [T, Hkv, D], RoPE applied; T >= 1.
        Returns:
            [T, Hq * D] in q's dtype.
        """
        ...


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer: int, dtype=None, device=None):
        super().__init__()
        h, d = config.hidden_size, config.head_dim
        self.layer = layer
        self.num_heads, self.num_kv_heads, self.head_dim = config.num_attention_heads, config.num_key_value_heads, d
        self.window = config.sliding_window if config.is_sliding(layer) else None
        self.scale = 1.0 / math.sqrt(d)
        kw = dict(dtype=dtype, device=device)
        self.q_proj = nn.Linear(h, config.q_size, bias=True, **kw)
        self.k_proj = nn.Linear(h, config.kv_size, bias=True, **kw)
        self.v_proj = nn.Linear(h, config.kv_size, bias=True, **kw)
        self.o_proj = nn.Linear(config.q_size, h, bias=True, **kw)
        self.sinks = nn.Parameter(torch.zeros(self.num_heads, **kw), requires_grad=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                context: AttentionContext) -> torch.Tensor:
        """x [T, H] (normed); cos, sin [T, head_dim / 2] -> [T, H]."""
        t = x.shape[0]
        if t == 0:
            # An idle rank of an EP group still runs every layer (for the MoE's all-to-all): no attention work.
            return torch.zeros_like(x)
        q = linear(x, self.q_proj.weight, self.q_proj.bias).view(t, self.num_heads, self.head_dim)
        k = linear(x, self.k_proj.weight, self.k_proj.bias).view(t, self.num_kv_heads, self.head_dim)
        v = linear(x, self.v_proj.weight, self.v_proj.bias).view(t, self.num_kv_heads, self.head_dim)
        out = context.attend(self, apply_rotary(q, cos, sin), apply_rotary(k, cos, sin), v)
        return linear(out, self.o_proj.weight, self.o_proj.bias)


def clamped_swiglu(h: torch.Tensor, alpha: float, limit: float) -> torch.Tensor:
    """h [N, 2I] with gate and linear parts INTERLEAVED (gate at even, linear at odd columns)."""
    glu, lin = h[..., 0::2], h[..., 1::2]
    glu = glu.clamp(max=limit)
    lin = lin.clamp(min=-limit, max=limit)
    return glu * torch.sigmoid(alpha * glu) * (lin + 1)  # the extra bias of 1 on the linear part


class Experts(nn.Module):
    """A set of experts (all, or one EP rank's share) in checkpoint orientation (`[E, out, in]`).

    packed=True keeps MXFP4 blocks and scales (4.25 bits/weight) and dequantizes an expert's weights
    when it runs; packed=False holds them dequantized in the model dtype.
    """

    def __init__(self, config: ModelConfig, expert_ids: list[int] | None = None, packed: bool = False,
                 dtype: torch.dtype = torch.bfloat16, device=None):
        super().__init__()
        self.expert_ids = list(range(config.num_local_experts)) if expert_ids is None else list(expert_ids)
        self.packed, self.dtype = packed, dtype
        self._float32_biases: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # see packed_projection
        self.alpha, self.limit = config.swiglu_alpha, config.swiglu_limit
        e, h, i = len(self.expert_ids), config.hidden_size, config.intermediate_size
        self.register_buffer("global_to_local", self.global_to_local_table(config).to(device), persistent=False)
        shapes = {"gate_up_proj": (e, 2 * i, h), "down_proj": (e, h, i)}
        for name, (ne, out_f, in_f) in shapes.items():
            if packed:
                g = in_f // mxfp4.BLOCK_SIZE
                self.register_buffer(f"{name}_blocks", torch.zeros(ne, out_f, g, 16, dtype=torch.uint8, device=device))
                self.register_buffer(f"{name}_scales", torch.zeros(ne, out_f, g, dtype=torch.uint8, device=device))
            else:
                self.register_buffer(name, torch.zeros(ne, out_f, in_f, dtype=dtype, device=device))
            self.register_buffer(f"{name}_bias", torch.zeros(ne, out_f, dtype=dtype, device=device))

    def global_to_local_table(self, config: ModelConfig) -> torch.Tensor:
        """[num_local_experts] long: global expert id -> index here, -1 where not held."""
        table = torch.full((config.num_local_experts,), -1, dtype=torch.long)
        table[self.expert_ids] = torch.arange(len(self.expert_ids))
        return table

    def weight(self, name: str, local: int) -> torch.Tensor:
        """The [out, in] weight of projection `name` of local expert `local`, in the model dtype. Packed
        experts give a dequantized copy in a buffer that the next call for that projection overwrites."""
        if self.packed:
            return mxfp4_linear.dequantize(getattr(self, f"{name}_blocks")[local],
                                           getattr(self, f"{name}_scales")[local], self.dtype, reuse=True)
        return getattr(self, name)[local]

    def run_expert(self, local: int, x: torch.Tensor) -> torch.Tensor:
        """x [N, H] -> [N, H] through local expert `local`."""
        h = linear(x, self.weight("gate_up_proj", local), self.gate_up_proj_bias[local])
        a = clamped_swiglu(h, self.alpha, self.limit)
        return linear(a, self.weight("down_proj", local), self.down_proj_bias[local])

    def run_grouped(self, x: torch.Tensor, counts: list[int]) -> torch.Tensor:
        """x [N, H] sorted by local expert, counts[e] rows for local expert e -> [N, H]."""
        few = MXFP4_KERNEL_MAX_TOKENS.get(x.dtype, 0)
        if self.packed and x.device.type == "cpu" and any(0 < n <= few for n in counts) and mxfp4_linear.available():
            # Experts with few tokens: all in one call, straight from the packed codes; the rest below.
            out = mxfp4_linear.experts(x, counts, self.packed_projection("gate_up_proj"),
                                       self.packed_projection("down_proj"), self.alpha, self.limit, few).to(x.dtype)
        else:
            out, few = torch.empty_like(x), 0
        start = 0
        for local, n in enumerate(counts):
            if n > few:
                out[start:start + n] = self.run_expert(local, x[start:start + n])
            start += n
        return out

    def packed_projection(self, name: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(blocks, scales, float32 bias) of projection `name` of every expert here, for the MXFP4 kernel."""
        bias = getattr(self, f"{name}_bias")
        if bias.dtype != torch.float32:
            if self._float32_biases.get(name) is None or self._float32_biases[name][0] is not bias:
                self._float32_biases[name] = (bias, bias.float())  # once per load, not per step
            bias = self._float32_biases[name][1]
        return getattr(self, f"{name}_blocks"), getattr(self, f"{name}_scales"), bias

    def forward(self, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor) -> torch.Tensor:
        """x [T, H]; topk_ids [T, k] global expert ids, all held here; topk_weights [T, k] -> [T, H]."""
        t, k = topk_ids.shape
        local_ids = self.global_to_local[topk_ids.flatten()]  # [T * k]
        if t and int(local_ids.min()) < 0:
            missing = sorted(set(topk_ids.flatten()[local_ids < 0].tolist()))
            raise RuntimeError(f"experts {missing} are not held by this model (it holds {self.expert_ids}); "
                               "run it inside an expert-parallel group")
        order = torch.argsort(local_ids, stable=True)
        token_of_row = order // k
        counts = torch.bincount(local_ids, minlength=len(self.expert_ids)).tolist()
        y = self.run_grouped(x[token_of_row], counts)  # [T * k, H] in expert order
        y = y.float() * topk_weights.flatten()[order, None].float()
        out = torch.zeros(t, x.shape[1], dtype=torch.float32, device=x.device)
        out.index_add_(0, token_of_row, y)
        return out.to(x.dtype)


class Router(nn.Module):
    def __init__(self, config: ModelConfig, dtype=None, device=None):
        super().__init__()
        self.top_k = config.num_experts_per_tok
        self.weight = nn.Parameter(torch.zeros(config.num_local_experts, config.hidden_size, dtype=dtype,
                                               device=device), requires_grad=False)
        self.bias = nn.Parameter(torch.zeros(config.num_local_experts, dtype=dtype, device=device),
                                 requires_grad=False)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [T, H] -> topk_ids [T, k] (sorted by logit), topk_weights [T, k] float32 (softmax over the k)."""
        logits = F.linear(x, self.weight, self.bias)
        values, ids = torch.topk(logits, self.top_k, dim=-1, sorted=True)
        return ids, torch.softmax(values.float(), dim=-1)


class MoE(nn.Module):
    """Router + experts. `parallel.moe.apply_expert_parallel` swaps the whole module for an
    `ExpertParallelMoE` with the same call: the same router, this rank's share of the experts run with
    `Experts.run_grouped`, and tokens sent to and back from the experts' ranks (dispatch/combine) in
    place of `Experts.forward`'s local gather and weighted sum."""

    def __init__(self, config: ModelConfig, expert_ids=None, packed=False, dtype=None, device=None):
        super().__init__()
        self.router = Router(config, dtype=dtype, device=device)
        self.experts = Experts(config, expert_ids, packed=packed, dtype=dtype, device=device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        topk_ids, topk_weights = self.router(x)
        return self.experts(x, topk_ids, topk_weights)


class Block(nn.Module):
    def __init__(self, config: ModelConfig, layer: int, expert_ids=None, packed=False, dtype=None, device=None):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype, device)
        self.self_attn = Attention(config, layer, dtype, device)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype, device)
        self.mlp = MoE(config, expert_ids, packed, dtype, device)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                context: AttentionContext) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, context)
        return x + self.mlp(self.post_attention_layernorm(x))


@dataclass
class LayerKV:
    """Contiguous K/V of one layer, growing with each pass; row s holds position s."""

    k: torch.Tensor | None = None  # [S, Hkv, D]
    v: torch.Tensor | None = None

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.k is None:
            self.k, self.v = k, v
        else:
            self.k = torch.cat((self.k, k))
            self.v = torch.cat((self.v, v))
        return self.k, self.v


@dataclass
class KVCache:
    """The reference path's `AttentionContext`: one sequence from position 0, contiguous K/V per layer,
    eager attention. Each pass continues the tokens already cached."""

    device: torch.device
    layers: list[LayerKV]

    @property
    def num_tokens(self) -> int:
        return 0 if not self.layers or self.layers[0].k is None else self.layers[0].k.shape[0]

    def positions(self, num_tokens: int) -> torch.Tensor:
        return torch.arange(self.num_tokens, self.num_tokens + num_tokens, device=self.device)

    def attend(self, attn: Attention, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        k, v = self.layers[attn.layer].append(k, v)
        k_positions = torch.arange(k.shape[0], device=k.device)
        mask = attention_mask(k_positions[-q.shape[0]:], k_positions, attn.window)
        return sink_attention(q, k, v, attn.sinks, mask, attn.scale)


class Transformer(nn.Module):
    """gpt-oss. `model(token_ids [T])` -> float32 logits [T, vocab] for a sequence from position 0."""

    def __init__(self, config: ModelConfig, expert_ids: list[int] | None = None, packed: bool = False,
                 dtype: torch.dtype = torch.bfloat16, device: str | torch.device = "cpu"):
        super().__init__()
        self.config, self.dtype = config, dtype
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, dtype=dtype, device=device)
        self.embed_tokens.weight.requires_grad_(False)
        self.layers = nn.ModuleList(
            Block(config, i, expert_ids, packed, dtype, device) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype, device)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False, dtype=dtype, device=device)
        self.lm_head.weight.requires_grad_(False)
        self.rotary = RotaryEmbedding(config, device)
        self.prepacked_lm_head: PrepackedLinearWeight | None = None  # see prepack_unembedding
        self.greedy_unembedding: GreedyUnembedding | None = None  # see prepare_greedy_unembedding

    @property
    def device(self) -> torch.device:
        return self.embed_tokens.weight.device

    def finish_load(self, device: torch.device) -> None:
        """Rebuilds the buffers derived from the config (not in checkpoints) on `device`, after a
        load that built the model on the meta device."""
        self.rotary = RotaryEmbedding(self.config, device)
        for block in self.layers:
            experts = block.mlp.experts
            experts.global_to_local = experts.global_to_local_table(self.config).to(device)

    def prepack_unembedding(self) -> bool:
        """For serving on CPU: keeps the unembedding (the largest matmul of a decode step) a second
        time in oneDNN's layout, at the cost of its memory again. Logits stay bit for bit the same.
        Call it once the weights are loaded: the copy does not follow later changes to lm_head.
        Returns whether it applies (float32 on a oneDNN CPU; bfloat16 where oneDNN has bf16: AVX-512
        BW/VL/DQ or AVX-NE-CONVERT)."""
        if self.prepacked_lm_head is None and PrepackedLinearWeight.supports(self.lm_head.weight):
            self.prepacked_lm_head = PrepackedLinearWeight(self.lm_head.weight)
        return self.prepacked_lm_head is not None

    def prepare_greedy_unembedding(self) -> bool:
        """For serving on CPU: keeps a 7-bit copy of the unembedding (a quarter of float32's bytes,
        half of bfloat16's) with which `greedy_tokens` finds greedy rows' argmax exactly without the
        full matmul (in bfloat16: the first largest logit rounded to bfloat16). Call it once the
        weights are loaded. Returns whether it applies (float32 or bfloat16 on a CPU where the
        screen's SIMD kernel builds; $GPTOSS_GREEDY_SCREEN=0 turns it off). The engine calls it only
        with `EngineConfig.greedy_screen` (off by default)."""
        if self.greedy_unembedding is None and GreedyUnembedding.applies(self.lm_head.weight):
            self.greedy_unembedding = GreedyUnembedding(self.lm_head.weight)
        return self.greedy_unembedding is not None

    def new_cache(self) -> KVCache:
        return KVCache(self.device, [LayerKV() for _ in self.layers])

    @torch.inference_mode()
    def forward(self, token_ids: torch.Tensor, context: AttentionContext | None = None,
                logit_rows: torch.Tensor | None = None) -> torch.Tensor:
        """The model's one forward pass, for the reference path and the engine alike.

        Args:
            token_ids: [T] the pass's new tokens (T may be 0: an idle EP rank still runs every layer).
            context: where attention keeps K/V and which positions the tokens have: a `new_cache()`
                the tokens continue, or an engine's paged step; None: a sequence from position 0.
            logit_rows: [N] long, the rows of token_ids whose logits are wanted; None: all.
        Returns:
            float32 logits [T, vocab], or [N, vocab] with `logit_rows`.
        """
        return self.unembed(self.final_hidden(token_ids, context, logit_rows))

    @torch.inference_mode()
    def final_hidden(self, token_ids: torch.Tensor, context: AttentionContext | None = None,
                     rows: torch.Tensor | None = None) -> torch.Tensor:
        """`forward` up to the unembedding: the final norm's output [T or N, hidden] (model dtype)."""
        if token_ids.dim() != 1:
            raise ValueError(f"token_ids must be 1-D [T], got shape {tuple(token_ids.shape)}")
        token_ids = token_ids.to(self.device)
        context = self.new_cache() if context is None else context
        cos, sin = self.rotary.cos_sin(context.positions(token_ids.shape[0]))
        x = self.embed_tokens(token_ids)
        for block in self.layers:
            x = block(x, cos, sin, context)
        if rows is not None:
            x = x[rows]  # the unembedding is the largest matmul: only for the rows that are sampled
        return self.norm(x)

    @torch.inference_mode()
    def unembed(self, hidden: torch.Tensor) -> torch.Tensor:
        """final_hidden [N, hidden] -> float32 logits [N, vocab]."""
        if self.prepacked_lm_head is not None:
            return self.prepacked_lm_head(hidden).float()
        return linear(hidden, self.lm_head.weight).float()

    @property
    def screens_greedy_rows(self) -> bool:
        """Whether `greedy_tokens` answers: the screen was prepared and has not given up."""
        return self.greedy_unembedding is not None and not self.greedy_unembedding.gave_up

    @torch.inference_mode()
    def greedy_tokens(self, hidden: torch.Tensor) -> torch.Tensor | None:
        """final_hidden [N, hidden] -> [N] long: each row's argmax token, or -1 where the screen left the
        row undecided (take its logits then); None where it does not answer (`screens_greedy_rows`)."""
        if not self.screens_greedy_rows:
            return None
        return self.greedy_unembedding(hidden)[0]
