"""`SamplingParams`: how one request picks its tokens and when it stops."""

from __future__ import annotations

import math
from dataclasses import dataclass

from gptoss.errors import invalid
from gptoss.greedy_threshold import MIN_TEMPERATURE

# harmony's <|return|> and <|call|> (= gptoss.tokenizer.STOP_TOKEN_IDS, not imported here because that
# module loads openai-harmony). Not <|end|>: the model ends an analysis message with it and goes on.
DEFAULT_STOP_TOKEN_IDS: tuple[int, ...] = (200002, 200012)
MAX_PENALTY = 2.0  # OpenAI's range for presence / frequency penalties is [-2, 2]


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_real(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


@dataclass(frozen=True)
class SamplingParams:
    """Sampling and stopping rules of one request; invalid values raise `InvalidRequestError` naming
    the field. The engine adds the checks that need the model (vocabulary, context length).

    A temperature below `MIN_TEMPERATURE` (1e-5; 0 among them) is greedy. Penalties apply to the
    tokens generated so far (not the prompt): `logit -= presence_penalty * [count > 0] +
    frequency_penalty * count`. Logprobs are those of the model's distribution (before penalties,
    temperature and filtering). Whatever the values, the most likely token survives top-k, top-p and
    min-p, so a tiny top_p or a min_p of 1 is greedy too.
    """

    max_tokens: int | None = None  # None: up to the engine's max_model_len
    temperature: float = 1.0
    top_p: float = 1.0  # nucleus mass in (0, 1]; 1 keeps every token
    top_k: int = 0  # keep the k most likely tokens; 0 keeps every token
    min_p: float = 0.0  # drop tokens below min_p * the top probability; 0 keeps every token
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None  # same seed + same prompt -> same tokens, whatever else is batched
    stop_token_ids: tuple[int, ...] = DEFAULT_STOP_TOKEN_IDS  # the stop token is part of the output
    logprobs: int | None = None  # None: no logprobs; n: the sampled token's and the top n per token

    def __post_init__(self) -> None:
        if not isinstance(self.stop_token_ids, tuple):
            try:
                object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))
            except TypeError:
                raise invalid("stop_token_ids", "a sequence of token ids", self.stop_token_ids) from None
        self.validate()

    def validate(self) -> None:
        if self.max_tokens is not None and not (_is_int(self.max_tokens) and self.max_tokens >= 1):
            raise invalid("max_tokens", "None or an int >= 1", self.max_tokens)
        if not (_is_real(self.temperature) and self.temperature >= 0):
            raise invalid("temperature", "a finite number >= 0", self.temperature)
        if not (_is_real(self.top_p) and 0 < self.top_p <= 1):
            raise invalid("top_p", "in (0, 1]", self.top_p)
        if not (_is_int(self.top_k) and self.top_k >= 0):
            raise invalid("top_k", "an int >= 0 (0 = off)", self.top_k)
        if not (_is_real(self.min_p) and 0 <= self.min_p <= 1):
            raise invalid("min_p", "in [0, 1]", self.min_p)
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if not (_is_real(value) and -MAX_PENALTY <= value <= MAX_PENALTY):
                raise invalid(name, f"in [-{MAX_PENALTY:g}, {MAX_PENALTY:g}]", value)
        if self.seed is not None and not (_is_int(self.seed) and 0 <= self.seed < 2**63):
            raise invalid("seed", "None or an int in [0, 2**63)", self.seed)
        if not all(_is_int(t) and t >= 0 for t in self.stop_token_ids):
            raise invalid("stop_token_ids", "token ids >= 0", self.stop_token_ids)
        if self.logprobs is not None and not (_is_int(self.logprobs) and self.logprobs >= 0):
            raise invalid("logprobs", "None or an int >= 0", self.logprobs)

    @property
    def is_greedy(self) -> bool:
        return self.temperature < MIN_TEMPERATURE

    @property
    def has_penalties(self) -> bool:
        return self.presence_penalty != 0 or self.frequency_penalty != 0

    @classmethod
    def greedy(cls, **changes) -> SamplingParams:
        """Greedy decoding (temperature 0), other fields as given."""
        return cls(**({"temperature": 0.0} | changes))
