"""The temperature below which a request is greedy: shared by the request's rules (engine) and the
sampler (gptoss.sampling), and importable without torch."""

# Temperatures below this are greedy for their row (vLLM draws the same line). At 1e-5 a logit gap of
# 1e-3 already leaves the runner-up e^-100 of the mass, so sampling could differ from argmax only on
# near-exact ties; far below it, logits / temperature overflows float32 (at 1e-39 a logit of 1 does)
# and the softmax turns into NaN.
MIN_TEMPERATURE = 1e-5
