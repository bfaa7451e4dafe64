"""Model configuration: field names are the HF `config.json` keys; derived values are properties."""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path

from gptoss.errors import CheckpointError

SLIDING = "sliding_attention"
FULL = "full_attention"


@dataclass(frozen=True)
class ModelConfig:
    num_hidden_layers: int
    num_local_experts: int
    num_experts_per_tok: int
    hidden_size: int
    intermediate_size: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    vocab_size: int = 201088
    sliding_window: int = 128
    layer_types: tuple[str, ...] = ()
    rms_norm_eps: float = 1e-5
    rope_theta: float = 150000.0
    rope_scaling_factor: float = 32.0
    rope_original_context: int = 4096  # `initial_context_length` / `original_max_position_embeddings`
    rope_beta_fast: float = 32.0
    rope_beta_slow: float = 1.0
    max_position_embeddings: int = 131072
    swiglu_alpha: float = 1.702
    swiglu_limit: float = 7.0
    eos_token_id: int = 200002
    pad_token_id: int = 199999

    def __post_init__(self) -> None:
        if not self.layer_types:
            # Sliding window on even layers (0, 2, ...), full attention on odd ones.
            types = tuple(SLIDING if i % 2 == 0 else FULL for i in range(self.num_hidden_layers))
            object.__setattr__(self, "layer_types", types)
        else:
            object.__setattr__(self, "layer_types", tuple(self.layer_types))
        self.validate()

    def validate(self) -> None:
        def need(ok: bool, what: str) -> None:
            if not ok:
                raise ValueError(f"model config: {what}")

        for name in ("num_hidden_layers", "num_local_experts", "num_experts_per_tok", "hidden_size",
                     "intermediate_size", "num_attention_heads", "num_key_value_heads", "head_dim",
                     "vocab_size", "sliding_window"):
            need(getattr(self, name) > 0, f"{name} must be > 0, got {getattr(self, name)}")
        need(self.num_experts_per_tok <= self.num_local_experts,
             f"num_experts_per_tok must be <= num_local_experts, got {self.num_experts_per_tok}")
        need(self.num_attention_heads % self.num_key_value_heads == 0,
             f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
             f"num_key_value_heads ({self.num_key_value_heads})")
        need(self.head_dim % 2 == 0, f"head_dim must be even, got {self.head_dim}")
        # MXFP4 blocks run along the input dimension of both expert projections.
        need(self.hidden_size % 32 == 0, f"hidden_size must be a multiple of 32, got {self.hidden_size}")
        need(self.intermediate_size % 32 == 0,
             f"intermediate_size must be a multiple of 32, got {self.intermediate_size}")
        need(len(self.layer_types) == self.num_hidden_layers,
             f"layer_types has {len(self.layer_types)} entries for {self.num_hidden_layers} layers")
        bad = sorted(set(self.layer_types) - {SLIDING, FULL})
        need(not bad, f"layer_types must be {SLIDING!r} or {FULL!r}, got {bad}")

    @property
    def q_size(self) -> int:
        return self.num_attention_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_key_value_heads * self.head_dim

    def is_sliding(self, layer: int) -> bool:
        return self.layer_types[layer] == SLIDING

    @property
    def num_params(self) -> int:
        h, i, e = self.hidden_size, self.intermediate_size, self.num_local_experts
        attn = h * (self.q_size + 2 * self.kv_size) + self.q_size * h + self.q_size + 2 * self.kv_size + h
        attn += self.num_attention_heads + 2 * h  # sinks, two norms
        moe = e * h + e + e * (h * 2 * i + 2 * i + i * h + h)
        return self.num_hidden_layers * (attn + moe) + 2 * self.vocab_size * h + h

    # --- config.json, both forms -------------------------------------------------------------

    def to_hf_dict(self) -> dict:
        return {
            "architectures": ["GptOssForCausalLM"],
            "model_type": "gpt_oss",
            "num_hidden_layers": self.num_hidden_layers,
            "num_local_experts": self.num_local_experts,
            "num_experts_per_tok": self.num_experts_per_tok,
            "experts_per_token": self.num_experts_per_tok,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "vocab_size": self.vocab_size,
            "sliding_window": self.sliding_window,
            "layer_types": list(self.layer_types),
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_scaling": {
                "rope_type": "yarn",
                "factor": self.rope_scaling_factor,
                "beta_fast": self.rope_beta_fast,
                "beta_slow": self.rope_beta_slow,
                "truncate": False,
                "original_max_position_embeddings": self.rope_original_context,
            },
            "initial_context_length": self.rope_original_context,
            "max_position_embeddings": self.max_position_embeddings,
            "swiglu_limit": self.swiglu_limit,
            "hidden_act": "silu",
            "attention_bias": True,
            "attention_dropout": 0.0,
            "tie_word_embeddings": False,
            "use_cache": True,
            "eos_token_id": self.eos_token_id,
            "pad_token_id": self.pad_token_id,
            "torch_dtype": "bfloat16",
            "quantization_config": {
                "quant_method": "mxfp4",
                "modules_to_not_convert": [
                    "model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head",
                ],
            },
        }

    def to_original_dict(self) -> dict:
        return {
            "num_hidden_layers": self.num_hidden_layers,
            "num_experts": self.num_local_experts,
            "experts_per_token": self.num_experts_per_tok,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "swiglu_limit": self.swiglu_limit,
            "head_dim": self.head_dim,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "sliding_window": self.sliding_window,
            "initial_context_length": self.rope_original_context,
            "rope_theta": self.rope_theta,
            "rope_scaling_factor": self.rope_scaling_factor,
            "rope_ntk_alpha": self.rope_beta_slow,
            "rope_ntk_beta": self.rope_beta_fast,
        }

    @classmethod
    def from_dict(cls, raw: dict, source: str = "config.json") -> ModelConfig:
        """Reads either form: HF (`num_local_experts`, `rope_scaling`/`rope_parameters`) or the OpenAI
        `original/config.json` (`num_experts`, `rope_scaling_factor`, `rope_ntk_alpha/beta`)."""
        try:
            if "num_local_experts" in raw:
                rope = raw.get("rope_parameters") or raw.get("rope_scaling") or {}
                kw = dict(
                    num_local_experts=raw["num_local_experts"],
                    num_experts_per_tok=raw.get("num_experts_per_tok", raw.get("experts_per_token", 4)),
                    rope_theta=rope.get("rope_theta", raw.get("rope_theta", 150000.0)),
                    rope_scaling_factor=rope.get("factor", 32.0),
                    rope_beta_fast=rope.get("beta_fast", 32.0),
                    rope_beta_slow=rope.get("beta_slow", 1.0),
                    rope_original_context=rope.get("original_max_position_embeddings",
                                                   raw.get("initial_context_length", 4096)),
                    max_position_embeddings=raw.get("max_position_embeddings", 131072),
                    layer_types=tuple(raw.get("layer_types") or ()),
                    rms_norm_eps=raw.get("rms_norm_eps", 1e-5),
                    swiglu_alpha=raw.get("swiglu_alpha", 1.702),
                )
                if rope.get("truncate", False):
                    raise ValueError("rope_scaling.truncate=true is not gpt-oss (its YaRN bounds are unrounded)")
                eos = raw.get("eos_token_id", 200002)
                kw["eos_token_id"] = eos[0] if isinstance(eos, list) else eos
                kw["pad_token_id"] = raw.get("pad_token_id", 199999)
            elif "num_experts" in raw:
                ctx = raw.get("initial_context_length", 4096)
                kw = dict(
                    num_local_experts=raw["num_experts"],
                    num_experts_per_tok=raw.get("experts_per_token", 4),
                    rope_theta=raw.get("rope_theta", 150000.0),
                    rope_scaling_factor=raw.get("rope_scaling_factor", 32.0),
                    rope_beta_fast=raw.get("rope_ntk_beta", 32.0),
                    rope_beta_slow=raw.get("rope_ntk_alpha", 1.0),
                    rope_original_context=ctx,
                    max_position_embeddings=int(ctx * raw.get("rope_scaling_factor", 32.0)),
                )
            else:
                raise ValueError("neither `num_local_experts` (HF form) nor `num_experts` (original form) is set")
            shared = ("num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads",
                      "num_key_value_heads", "head_dim", "vocab_size", "sliding_window")
            kw.update({k: raw[k] for k in shared})
            if "swiglu_limit" in raw:
                kw["swiglu_limit"] = raw["swiglu_limit"]
            return cls(**kw)
        except KeyError as e:
            raise ValueError(f"{source}: missing key {e.args[0]!r}") from None
        except (TypeError, ValueError) as e:
            raise ValueError(f"{source}: {e}") from None

    @classmethod
    def from_json_file(cls, path: str | Path) -> ModelConfig:
        """A checkpoint's config.json; any fault in it is a CheckpointError (the server's, not a request's)."""
        path = Path(path)
        try:
            raw = json.loads(path.read_text())
        except FileNotFoundError:
            raise CheckpointError(f"{path}: no config.json") from None
        except (OSError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{path}: cannot read ({e})") from None
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{path}: not valid JSON ({e})") from None
        if not isinstance(raw, dict):
            raise CheckpointError(f"{path}: must hold a JSON object, got {type(raw).__name__}")
        try:
            return cls.from_dict(raw, source=str(path))
        except ValueError as e:
            raise CheckpointError(str(e)) from None

    def replace(self, **changes) -> ModelConfig:
        if "num_hidden_layers" in changes and "layer_types" not in changes:
            changes["layer_types"] = ()
        return dataclasses.replace(self, **changes)


_COMMON = dict(vocab_size=201088, sliding_window=128, num_experts_per_tok=4)

PRESETS: dict[str, ModelConfig] = {
    "gpt-oss-120b": ModelConfig(num_hidden_layers=36, num_local_experts=128, hidden_size=2880,
                                intermediate_size=2880, num_attention_heads=64, num_key_value_heads=8,
                                head_dim=64, **_COMMON),
    "gpt-oss-20b": ModelConfig(num_hidden_layers=24, num_local_experts=32, hidden_size=2880,
                               intermediate_size=2880, num_attention_heads=64, num_key_value_heads=8,
                               head_dim=64, **_COMMON),
    # Speed at the real width: gpt-oss-20b's widths (hidden 2880, 64 q / 8 kv heads, vocabulary 201,088,
    # 32 experts top-4, window 128) in 2 layers, which write in a minute or two and fit beside a
    # dequantized copy of them.
    "gpt-oss-20b-2l": ModelConfig(num_hidden_layers=2, num_local_experts=32, hidden_size=2880,
                                  intermediate_size=2880, num_attention_heads=64, num_key_value_heads=8,
                                  head_dim=64, **_COMMON),
    # CPU benchmarks: the shape other engines publish CPU figures for.
    "small": ModelConfig(num_hidden_layers=4, num_local_experts=16, hidden_size=512, intermediate_size=512,
                         num_attention_heads=8, num_key_value_heads=2, head_dim=64, **_COMMON),
    # Tests: the real vocabulary so the real tokenizer works with it.
    "tiny": ModelConfig(num_hidden_layers=2, num_local_experts=8, hidden_size=64, intermediate_size=64,
                        num_attention_heads=4, num_key_value_heads=2, head_dim=32, **_COMMON),
}


def get_preset(name: str) -> ModelConfig:
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"preset must be one of {sorted(PRESETS)}, got {name!r}") from None


def yarn_concentration(factor: float) -> float:
    return 0.1 * math.log(factor) + 1.0
