"""Our forward pass against Hugging Face transformers' GptOssForCausalLM (eager attention, float32),
both loading the same MXFP4 checkpoint written by our writer."""

import warnings

import pytest
import torch

import gptoss
from gptoss import mxfp4_linear
from gptoss.model import PrepackedLinearWeight

transformers = pytest.importorskip("transformers")

TINY = gptoss.get_preset("tiny")
CONFIGS = {
    # GQA 2, two layers, the real window of 128: 200 tokens cross it.
    "tiny-gqa2": (TINY, 200),
    # GQA 4, three layers (odd count), a short window crossed many times.
    "gqa4-window16": (TINY.replace(num_hidden_layers=3, num_attention_heads=8, num_key_value_heads=2,
                                   sliding_window=16, num_local_experts=6, num_experts_per_tok=2), 90),
    # No grouping (GQA 1), wider experts than the hidden size, head_dim 64 as in the release.
    "gqa1-head64": (TINY.replace(num_attention_heads=2, num_key_value_heads=2, head_dim=64,
                                 intermediate_size=96, sliding_window=32), 70),
}


def load_hf(path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return transformers.GptOssForCausalLM.from_pretrained(
            path, dtype=torch.float32, attn_implementation="eager",
            quantization_config=transformers.Mxfp4Config(dequantize=True)).eval()


@pytest.mark.parametrize("name", list(CONFIGS), ids=list(CONFIGS))
def test_logits_match_transformers_at_every_position(name, tmp_path):
    config, length = CONFIGS[name]
    path = gptoss.write_random_checkpoint(tmp_path, config, seed=3)
    ours = gptoss.load_model(path, dtype=torch.float32)
    theirs = load_hf(path)
    ids = torch.randint(0, config.vocab_size, (length,), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = theirs(ids[None]).logits[0].float()
    got = ours(ids)
    rel = ((got - want).abs().max() / want.abs().max()).item()
    assert rel < 1e-4, f"max |diff| / max |logit| = {rel:.2e}"
    assert torch.equal(got.argmax(-1), want.argmax(-1))


def test_packed_experts_dequantized_per_use_compute_the_same_logits(tiny_checkpoint, tiny_model, monkeypatch):
    monkeypatch.setenv("GPTOSS_MXFP4_KERNEL", "0")
    packed = gptoss.load_model(tiny_checkpoint, dtype=torch.float32, packed_experts=True)
    ids = torch.randint(0, 201088, (40,), generator=torch.Generator().manual_seed(2))
    assert torch.equal(packed(ids), tiny_model(ids))


@pytest.mark.skipif(not mxfp4_linear.available(), reason="no C compiler to build the MXFP4 kernel")
def test_packed_experts_on_the_mxfp4_kernel_agree_to_float32_rounding(tiny_checkpoint, tiny_model, monkeypatch):
    packed = gptoss.load_model(tiny_checkpoint, dtype=torch.float32, packed_experts=True)
    ids = torch.randint(0, 201088, (40,), generator=torch.Generator().manual_seed(2))  # ~20 tokens per expert
    got, want = packed(ids), tiny_model(ids)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert torch.equal(got.argmax(-1), want.argmax(-1))
    # Experts over the kernel's limit are dequantized and multiplied by oneDNN beside the kernel's.
    monkeypatch.setitem(gptoss.model.MXFP4_KERNEL_MAX_TOKENS, torch.float32, 12)
    mixed = packed(ids)
    torch.testing.assert_close(mixed, want, rtol=1e-5, atol=1e-5)
    assert torch.equal(mixed.argmax(-1), want.argmax(-1))


@pytest.mark.skipif(not mxfp4_linear.available(), reason="no C compiler to build the MXFP4 kernel")
def test_packed_bfloat16_experts_on_the_kernel_are_no_less_accurate_than_dequantized_ones(tiny_checkpoint,
                                                                                           tiny_model):
    ids = torch.randint(0, 201088, (12,), generator=torch.Generator().manual_seed(4))  # <= 16 tokens per expert
    reference = tiny_model(ids)  # float32
    errors = {}
    for packed in (True, False):
        model = gptoss.load_model(tiny_checkpoint, dtype=torch.bfloat16, packed_experts=packed)
        errors[packed] = (model(ids).float() - reference).abs().max().item()
    # The kernel keeps float32 between the two projections; the dequantized path rounds to bf16 there.
    assert errors[True] <= 1.5 * errors[False], errors


def test_logit_rows_unembed_only_those_rows(tiny_model):
    ids = torch.randint(0, 201088, (24,), generator=torch.Generator().manual_seed(3))
    rows = torch.tensor([23, 4, 0])
    got = tiny_model(ids, logit_rows=rows)
    assert got.shape == (3, 201088)
    torch.testing.assert_close(got, tiny_model(ids)[rows], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("num_rows", [1, 2, 7, 32], ids=lambda n: f"{n}-rows")
def test_a_prepacked_unembedding_gives_the_same_logits_bit_for_bit(tiny_checkpoint, num_rows, dtype):
    model = gptoss.load_model(tiny_checkpoint, dtype=dtype)
    if not PrepackedLinearWeight.supports(model.lm_head.weight):
        assert not model.prepack_unembedding()
        pytest.skip(f"oneDNN cannot prepack {dtype} weights on this CPU "
                    f"({torch.backends.cpu.get_cpu_capability()}): the plain unembedding runs")
    ids = torch.randint(0, 201088, (40,), generator=torch.Generator().manual_seed(5))
    rows = torch.arange(num_rows)
    plain = model(ids, logit_rows=rows)
    assert model.prepacked_lm_head is None and model.prepack_unembedding()
    assert torch.equal(model(ids, logit_rows=rows), plain)


def test_bfloat16_model_tracks_float32(tiny_checkpoint, tiny_model):
    bf16 = gptoss.load_model(tiny_checkpoint, dtype=torch.bfloat16)
    ids = torch.randint(0, 201088, (64,), generator=torch.Generator().manual_seed(4))
    want, got = tiny_model(ids), bf16(ids)
    assert got.dtype == torch.float32 and torch.isfinite(got).all()
    assert ((got - want).abs().mean() / want.abs().mean()).item() < 0.05
    assert (got.argmax(-1) == want.argmax(-1)).float().mean().item() > 0.8


def test_activations_stay_in_a_realistic_range(tiny_model):
    ids = torch.randint(0, 201088, (32,), generator=torch.Generator().manual_seed(5))
    logits = tiny_model(ids)
    assert 0.5 < logits.std().item() < 10
    probs = torch.softmax(logits, -1)
    assert (probs.amax(-1) < 0.99).all()  # not collapsed onto one token
