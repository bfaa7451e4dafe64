"""One choice's token stream -> events: harmony parsing (or plain decoding), stop strings, the reasoning
switch, logprobs of the answer's tokens, tool-call ids and the finish reason. Used by the gateway for
both APIs and by batch jobs to parse their rows."""

from __future__ import annotations

import dataclasses
import uuid
from dataclasses import dataclass

from engine.outputs import TokenLogprobs
from gptoss.errors import UnavailableError
from gptoss.harmony import (
    StreamDelta,
    StreamingParser,
    TextDelta,
    ToolCallArgsDelta,
    ToolCallStart,
    merge_deltas,
)
from gptoss.tokenizer import CALL_ID, IncrementalDecoder
from serve.admission import Generation
from serve.model_protocol import ModelChunk


@dataclass(frozen=True)
class ChoiceUsage:
    num_prompt_tokens: int
    num_output_tokens: int
    num_cached_tokens: int
    num_reasoning_tokens: int


@dataclass(frozen=True)
class ChoiceEvent:
    """What one choice added since its previous event; the last one has `finish_reason`."""

    index: int
    token_ids: tuple[int, ...]
    deltas: tuple[StreamDelta, ...]  # text by channel ("final" for plain text), tool-call starts and args
    logprobs: tuple[TokenLogprobs, ...]  # of the tokens whose text is in the answer (or all, for plain text)
    finish_reason: str | None = None  # "stop", "length", "tool_calls", "abort" (cancelled by Abort)
    usage: ChoiceUsage | None = None  # the choice's counts so far (final on the last event)
    replica_id: str = ""  # the model server replica (EP group) serving the choice


def new_tool_call_id() -> str:
    """An id for a tool call the model made, in OpenAI's form."""
    return f"call_{uuid.uuid4().hex[:24]}"


class StopStrings:
    """Cuts a text stream at the first stop string that completes. Text that could be the start of a
    stop string is held back until the next piece decides it, so no client ever sees part of one.

    Each stop string is matched by a Knuth-Morris-Pratt automaton: a character costs amortized O(1) per
    stop string, whatever their lengths and however much text is held (rescanning the held text for
    every new token made a 70,000-character stop string cost seconds per token)."""

    def __init__(self, stops: tuple[str, ...]):
        self.stops = tuple(s for s in stops if s)
        self._fallback = [_kmp_fallback(s) for s in self.stops]
        self._matched = [0] * len(self.stops)  # longest prefix of each stop string the text ends with
        self._held = ""

    def feed(self, text: str) -> tuple[str, bool]:
        """(text to emit, whether a stop string ended the stream)."""
        held = self._held
        for offset, char in enumerate(text):
            completed = [k for k in range(len(self.stops)) if self._advance(k, char)]
            if completed:
                longest = max(len(self.stops[k]) for k in completed)  # the one that starts first
                whole = held + text[: offset + 1]
                self._held = ""
                return whole[: len(whole) - longest], True
        whole = held + text
        keep = max(self._matched, default=0)
        self._held = whole[len(whole) - keep:] if keep else ""
        return whole[: len(whole) - keep], False

    def flush(self) -> str:
        held, self._held = self._held, ""
        return held

    def _advance(self, k: int, char: str) -> bool:
        stop, fallback, matched = self.stops[k], self._fallback[k], self._matched[k]
        while matched and stop[matched] != char:
            matched = fallback[matched - 1]
        if stop[matched] == char:
            matched += 1
        if matched == len(stop):
            self._matched[k] = fallback[matched - 1]
            return True
        self._matched[k] = matched
        return False


def _kmp_fallback(pattern: str) -> list[int]:
    """For each prefix length i + 1, the length of its longest proper prefix that is also its suffix."""
    fallback = [0] * len(pattern)
    matched = 0
    for i in range(1, len(pattern)):
        while matched and pattern[i] != pattern[matched]:
            matched = fallback[matched - 1]
        if pattern[i] == pattern[matched]:
            matched += 1
        fallback[i] = matched
    return fallback


class ChoiceAssembler:
    """Turns one choice's model chunks into events."""

    def __init__(self, index: int, generation: Generation):
        self.index = index
        self.generation = generation
        self.parser = StreamingParser() if generation.harmony else None
        self.decoder = None if generation.harmony else IncrementalDecoder()
        self.stop = StopStrings(generation.stop) if generation.stop else None
        self.stopped = False  # by a stop string
        self.num_reasoning_tokens = 0
        self._carry: list[StreamDelta] = []
        if self.parser is not None and generation.prefill_token_ids:
            self._carry = self.parser.feed(generation.prefill_token_ids)  # e.g. the named tool call's start

    def add(self, chunk: ModelChunk) -> ChoiceEvent:
        deltas, self._carry = self._carry, []
        logprobs: list[TokenLogprobs] = []
        for i, token in enumerate(chunk.token_ids):
            if self.stopped:
                break
            token_deltas = self._token_deltas(token)
            if any(isinstance(d, TextDelta) and d.channel == "analysis" for d in token_deltas):
                self.num_reasoning_tokens += 1
            if chunk.logprobs is not None and self._is_answer(token_deltas):
                logprobs.append(chunk.logprobs[i])
            deltas += token_deltas
        finish_reason = "stop" if self.stopped else None
        if finish_reason is None and chunk.finish_reason is not None:
            deltas += self._flush()
            finish_reason = self._finish_reason(chunk)
        usage = ChoiceUsage(chunk.num_prompt_tokens, chunk.num_output_tokens, chunk.num_cached_tokens,
                            self.num_reasoning_tokens)
        if not self.generation.include_reasoning:
            deltas = [d for d in deltas if not (isinstance(d, TextDelta) and d.channel == "analysis")]
        deltas = [dataclasses.replace(d, call_id=new_tool_call_id()) if isinstance(d, ToolCallStart) else d
                  for d in merge_deltas(deltas)]
        return ChoiceEvent(self.index, chunk.token_ids, tuple(deltas), tuple(logprobs), finish_reason, usage,
                           chunk.replica_id)

    def _token_deltas(self, token: int) -> list[StreamDelta]:
        if self.parser is not None:
            deltas = self.parser.feed(token)
        else:
            text = self.decoder.feed([token])
            deltas = [TextDelta("final", text)] if text else []
        return self._apply_stop(deltas)

    def _apply_stop(self, deltas: list[StreamDelta]) -> list[StreamDelta]:
        if self.stop is None:
            return deltas
        out: list[StreamDelta] = []
        for delta in deltas:
            if isinstance(delta, TextDelta) and delta.channel == "final":
                text, hit = self.stop.feed(delta.text)
                if text:
                    out.append(TextDelta("final", text))
                if hit:
                    self.stopped = True
                    break
            else:
                out.append(delta)
        return out

    @staticmethod
    def _is_answer(deltas: list[StreamDelta]) -> bool:
        return any(isinstance(d, TextDelta) and d.channel != "analysis" or isinstance(d, ToolCallArgsDelta)
                   for d in deltas)

    def _flush(self) -> list[StreamDelta]:
        if self.parser is not None:
            deltas = self.parser.finish()
        else:
            text = self.decoder.flush()
            deltas = [TextDelta("final", text)] if text else []
        deltas = self._apply_stop(deltas)
        if self.stop is not None and not self.stopped:
            held = self.stop.flush()
            if held:
                deltas.append(TextDelta("final", held))
        return deltas

    def _finish_reason(self, chunk: ModelChunk) -> str:
        if chunk.finish_reason == "abort":  # the model server aborted it (draining)
            raise UnavailableError("the model server aborted the request (it is shutting down); retry")
        if chunk.finish_reason == "stop" and self.parser is not None and chunk.token_ids[-1:] == (CALL_ID,):
            return "tool_calls"
        return chunk.finish_reason
