"""A purpose-written checkpoint whose greedy output is fixed: a bigram machine in the real layout.

A random-weight model never speaks harmony, so the serving path's tool calls could only be tested with
a fake engine. This checkpoint makes the real engine, tokenizer and parser produce a real tool call:
`write_scripted_checkpoint` takes a `tiny` random checkpoint (HF release layout, MXFP4 experts) and
rewrites a few tensors so that the model's next token after t is `successors[t]`, whatever came before:

- every attention output projection (o_proj weight and bias) and every expert's down projection
  (MXFP4 code 0 = +0 whatever the scale, and its bias) is zero, so each block adds exactly 0 to the
  residual stream and the last hidden state is the last token's embedding;
- scripted token t has embedding `e_d` (its own unit direction d), every other token 0;
- the final norm weight is 1, so the normed state is ~sqrt(hidden) * e_d in float32 and bfloat16 alike;
- lm_head row `successors[t]` holds `_LOGIT_GAIN` on direction d (a token that follows several others
  has several directions), every other entry 0.

The successor's logit is then ~32 and every other logit exactly 0: greedy picks it, and even sampling at
temperature 1 does so with probability ~1 - 3e-9. A token not in `successors` gets all-zero logits
(greedy: token 0). The query/key/value projections, sinks, router and gate_up stay random: they run, but
nothing they compute reaches the logits.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

import gptoss
from gptoss.checkpoint import HF_INDEX
from gptoss.tokenizer import CALL_ID, CHANNEL_ID, CONSTRAIN_ID, MESSAGE_ID

PRESET = "tiny"
# lm_head weight on a scripted direction: the normed state is ~sqrt(64) = 8 there, so logits are ~32.
_LOGIT_GAIN = 4.0

ASSISTANT_ID = 173781  # "assistant", the last token of every rendered prompt

TOOL_CALL_NAME = "get_weather"
TOOL_CALL_ARGUMENTS = '{"city": "Paris"}'
# What follows the prompt's `<|start|>assistant` when the assistant calls get_weather with
# TOOL_CALL_ARGUMENTS, as openai_harmony renders it (recipient before channel). No token repeats, so the
# bigram script below is a function.
TOOL_CALL_COMPLETION: tuple[int, ...] = (
    316,     # " to"
    28,      # "="
    44580,   # "functions"
    775,     # ".get"
    170154,  # "_weather"
    CHANNEL_ID,
    12606,   # "comment"
    815,     # "ary"
    220,     # " "
    CONSTRAIN_ID,
    4108,    # "json"
    MESSAGE_ID,
    10848,   # '{"'
    17500,   # "city"
    1243,    # '":'
    392,     # ' "'
    72782,   # "Paris"
    18583,   # '"}'
    CALL_ID,  # a stop token
)
# Greedy after a prompt ending with `<|start|>assistant`: the tool call above. Every suffix of the chain
# continues it too, e.g. after `harmony.tool_call_prefill("get_weather")` or `tool_call_prefill(None)`.
TOOL_CALL_SCRIPT: dict[int, int] = dict(zip((ASSISTANT_ID, *TOOL_CALL_COMPLETION[:-1]), TOOL_CALL_COMPLETION,
                                            strict=True))


def write_scripted_checkpoint(path: str | Path, successors: dict[int, int], seed: int = 0) -> Path:
    """Writes a `tiny` checkpoint (HF release layout) whose greedy next token after t is successors[t].

    Args:
        path: output folder (created).
        successors: token id -> the token id that must follow it; at most hidden_size (64) keys.
        seed: seed of the random tensors that do not reach the logits (attention q/k/v, router, gate_up).
    Returns:
        the folder written.
    Raises:
        ValueError: too many scripted tokens, or a token id outside the vocabulary.
    """
    config = gptoss.get_preset(PRESET)
    if len(successors) > config.hidden_size:
        raise ValueError(f"successors must have at most {config.hidden_size} keys (one hidden direction each), "
                         f"got {len(successors)}")
    bad = sorted(t for pair in successors.items() for t in pair if not 0 <= t < config.vocab_size)
    if bad:
        raise ValueError(f"successors must hold token ids in [0, {config.vocab_size}), got {bad}")
    out = gptoss.write_random_checkpoint(path, config, seed=seed)
    token_to_direction = {t: d for d, t in enumerate(successors)}
    index = json.loads((out / HF_INDEX).read_text())
    for shard in sorted(set(index["weight_map"].values())):
        tensors = load_file(out / shard)
        for name, t in tensors.items():
            tensors[name] = _scripted(name, t, successors, token_to_direction)
        save_file(tensors, out / shard, metadata={"format": "pt"})
    return out


def _scripted(name: str, t: torch.Tensor, successors: dict[int, int],
              token_to_direction: dict[int, int]) -> torch.Tensor:
    """Checkpoint tensor `name` of the bigram machine: same dtype and shape as the random one."""
    if name.endswith(("self_attn.o_proj.weight", "self_attn.o_proj.bias", "mlp.experts.down_proj_blocks",
                      "mlp.experts.down_proj_bias")):
        return torch.zeros_like(t)  # the block adds nothing to the residual stream
    if name == "model.norm.weight":
        return torch.ones_like(t)
    if name == "model.embed_tokens.weight":
        out = torch.zeros_like(t)  # [vocab, hidden]
        for token, d in token_to_direction.items():
            out[token, d] = 1.0
        return out
    if name == "lm_head.weight":
        out = torch.zeros_like(t)  # [vocab, hidden]
        for token, d in token_to_direction.items():
            out[successors[token], d] = _LOGIT_GAIN
        return out
    return t
