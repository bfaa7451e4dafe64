"""`ModelRunner`: one step of the model over the paged KV cache.

The model's own forward does the math (an expert-parallel MoE may have replaced its MoE layers); the
runner owns the paged cache and feeds the forward the step's tokens as one flat batch [T] with a
`PagedAttentionContext`, so attention reads and writes the pages. Index tensors are built once per
step and KV group, then shared by all the layers of the group.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from engine.attention import PagedAttentionContext, build_attention_metadata
from engine.kv_cache_manager import KVCacheGroup
from engine.scheduler import SchedulerOutput
from gptoss.config import ModelConfig
from gptoss.model import Transformer


def kv_block_bytes(config: ModelConfig, groups: tuple[KVCacheGroup, ...], block_size: int,
                   dtype: torch.dtype) -> int:
    """Bytes of one block: K and V of block_size tokens in as many layers as the largest group has
    (a block serves one group at a time; groups share the pool)."""
    num_slots = max(len(g.layer_ids) for g in groups)
    return num_slots * 2 * config.kv_size * block_size * torch.empty(0, dtype=dtype).element_size()


@dataclass(frozen=True)
class StepInputs:
    input_ids: torch.Tensor  # [T]
    context: PagedAttentionContext  # the tokens' positions and where each layer's K/V go
    sample_rows: torch.Tensor  # [num_sampled]: rows whose next token is sampled


class ModelRunner:
    def __init__(self, model: Transformer, groups: tuple[KVCacheGroup, ...], num_blocks: int, block_size: int,
                 greedy_screen: bool = False):
        config = model.config
        self.model, self.groups, self.block_size = model, groups, block_size
        self.device = model.device
        # Every step unembeds a row per running request: worth a second, prepacked copy on CPU, and (opt-in)
        # a 7-bit one that finds greedy rows' tokens exactly without the full matmul. Both are counted by
        # the load's memory check (`unembedding_copy_bytes`).
        model.prepack_unembedding()
        if greedy_screen:
            model.prepare_greedy_unembedding()
        group_of_layer = {layer: gi for gi, g in enumerate(groups) for layer in g.layer_ids}
        slot_of_layer = {layer: si for g in groups for si, layer in enumerate(g.layer_ids)}
        self.group_of_layer = [group_of_layer[i] for i in range(config.num_hidden_layers)]
        num_slots = max(len(g.layer_ids) for g in groups)
        # Layer slot s of every group shares one tensor; a block id belongs to one group at a time.
        self.kv_cache = torch.zeros(num_slots, 2, config.num_key_value_heads, num_blocks, block_size,
                                    config.head_dim, dtype=model.dtype, device=self.device)
        self.layer_kv = [(self.kv_cache[slot_of_layer[i], 0], self.kv_cache[slot_of_layer[i], 1])
                         for i in range(config.num_hidden_layers)]
        self.last_forward_s = 0.0

    def execute(self, batch: SchedulerOutput) -> torch.Tensor:
        """Computes the step's tokens into the cache; returns the final hidden states [num_sampled,
        hidden] of the requests with `sample` set, in batch order, for `logits` or `greedy_tokens`.
        Runs every layer even for an empty batch (an expert-parallel MoE needs every rank in every
        layer's all-to-all). `last_forward_s` counts this and the step's unembedding calls."""
        inputs = self.prepare(batch)
        start = time.perf_counter()
        hidden = self.forward(inputs)
        self.last_forward_s = time.perf_counter() - start
        return hidden

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """float32 logits [N, vocab] of `execute`'s rows."""
        start = time.perf_counter()
        logits = self.model.unembed(hidden)
        self.last_forward_s += time.perf_counter() - start
        return logits

    def greedy_tokens(self, hidden: torch.Tensor) -> torch.Tensor | None:
        """The argmax token of each of `execute`'s rows ([N] long, -1 where undecided), without their
        logits; None where the model has no screened unembedding (see Transformer.greedy_tokens)."""
        start = time.perf_counter()
        tokens = self.model.greedy_tokens(hidden)
        self.last_forward_s += time.perf_counter() - start
        return tokens

    def prepare(self, batch: SchedulerOutput) -> StepInputs:
        input_ids: list[int] = []
        positions: list[int] = []
        request_of_token: list[int] = []
        sample_rows: list[int] = []
        for i, item in enumerate(batch.requests):
            input_ids.extend(item.token_ids)
            n = len(item.token_ids)
            positions.extend(range(item.start_position, item.start_position + n))
            request_of_token.extend([i] * n)
            if item.sample:
                sample_rows.append(len(input_ids) - 1)
        positions_t = torch.tensor(positions, dtype=torch.long)
        request_of_token_t = torch.tensor(request_of_token, dtype=torch.long)
        starts = [item.start_position for item in batch.requests]
        lens = [len(item.token_ids) for item in batch.requests]
        metadata = tuple(
            build_attention_metadata(starts, lens, batch.num_decodes, [item.block_offsets[gi] for item in batch.requests],
                                     [item.block_ids[gi] for item in batch.requests], self.block_size, group.window,
                                     positions_t, self.device, request_of_token_t)
            for gi, group in enumerate(self.groups))
        dev = self.device
        context = PagedAttentionContext(positions_t.to(dev), self.layer_kv,
                                        tuple(metadata[g] for g in self.group_of_layer))
        return StepInputs(torch.tensor(input_ids, dtype=torch.long).to(dev), context,
                          torch.tensor(sample_rows, dtype=torch.long).to(dev))

    def forward(self, inputs: StepInputs) -> torch.Tensor:
        return self.model.final_hidden(inputs.input_ids, inputs.context, rows=inputs.sample_rows)
