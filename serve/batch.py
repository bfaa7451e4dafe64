"""Batch inference on Ray Data, through the same app config, EP groups, harmony rendering and parsing as
online serving.

Input rows (JSONL or Parquet) carry an `id` (unique) and either
- `messages`: an OpenAI chat request's fields (`messages`, `tools`, `tool_choice`, `reasoning_effort`,
  `include_reasoning`, `max_tokens`, `temperature`, `top_p`, `top_k`, `min_p`, `seed`, `stop`,
  penalties), validated exactly as `POST /v1/chat/completions` validates them; or
- `input`: a Responses API request's fields (`input` items or text, `instructions`, `tools`,
  `tool_choice`, `reasoning`, `max_output_tokens`, `temperature`, `top_p`), validated as
  `POST /v1/responses` validates them (a row is not stored and continues no stored response); or
- `prompt_token_ids`: token ids, with the same sampling fields. Generation stops at harmony's stop
  tokens; a prompt that ends with `<|start|>assistant` (a rendered harmony conversation) is parsed back
  with harmony, any other is decoded as plain text.

Stages: read -> render (CPU tasks) -> generate (one Ray Data actor per EP group; each keeps its group
full: batches overlap, the engine batches their rows continuously) -> parse (CPU tasks) -> result rows:
`id`, `text`, `reasoning`, `tool_calls` (a JSON list, OpenAI's shape), `finish_reason`, `prompt_tokens`,
`completion_tokens`, `cached_tokens`, `completion_token_ids`, `error`. A bad row gives a row with
`error` set (naming the field), never a failed job.

`batch_generate(ds, config)` is the Python API (a lazy Dataset in, one out); `run_batch` is
`gptoss-serve batch`: it writes parts atomically into the output folder, skips the ids already written
(so a rerun after a crash or Ctrl-C resumes), and reports progress.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import math
import os
import sys
import time
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from engine.sampling_params import DEFAULT_STOP_TOKEN_IDS, SamplingParams
from gptoss.errors import ClientError, InvalidRequestError, UnavailableError
from gptoss.tokenizer import START_ID, encode
from serve.admission import AdmissionContext, Generation, RequestLimits, prepare_chat, prepare_completion
from serve.choices import ChoiceAssembler
from serve.config import AppConfig
from serve.model_protocol import ModelChunk
from serve.openai_protocol import (
    ChatChoiceAccumulator,
    ChatCompletionRequest,
    ChatDeltaBuilder,
    CompletionRequest,
    parse_body,
)
from serve.responses_protocol import admit_responses_request

logger = logging.getLogger(__name__)

RESULT_COLUMNS = ("id", "text", "reasoning", "tool_calls", "finish_reason", "prompt_tokens", "completion_tokens",
                  "cached_tokens", "completion_token_ids", "error")
_ROWS_PER_BLOCK = 32
GROUP_NAME_PREFIX = "gptoss-batch-"
# Rendering and parsing are light: a fraction of a CPU each, so they are never starved behind the
# groups' ranks, which reserve whole CPUs (at one CPU a task could not start until a group let go).
_CPU_STAGE_CPUS = 0.25


def _cpu_stage_concurrency(config: AppConfig) -> int:
    """Parallel render / parse tasks: a few per group keep up with generation (each is cheap), and a
    bound keeps Ray Data from starting a worker process per fraction of a CPU."""
    return 2 * config.batch.num_groups
_RENDERED_COLUMNS = ("id", "prompt_token_ids", "prefill_token_ids", "sampling", "stop", "harmony",
                     "include_reasoning", "error")
_SAMPLING_FIELDS = ("max_tokens", "temperature", "top_p", "top_k", "min_p", "seed", "stop", "presence_penalty",
                    "frequency_penalty")


# --- render (CPU) ------------------------------------------------------------------------------------

def render_batch(table, jsonl: bool = False, limits: RequestLimits | None = None) -> dict[str, list]:
    """A batch of input rows (a pyarrow Table; JSONL lines in its `text` column when `jsonl`) ->
    rendered rows, one per input row, all of the same shape."""
    rendered = [render_row(_parse_line(row["text"]) if jsonl else row, limits) for row in table.to_pylist()]
    return {name: [r[name] for r in rendered] for name in _RENDERED_COLUMNS}


def _parse_line(line: str) -> dict[str, Any]:
    """A JSONL line as a row; a line that is not a JSON object becomes a row without an id (an error row)."""
    try:
        row = json.loads(line)
    except json.JSONDecodeError as e:
        return {"_error": f"the line is not JSON: {e}"}
    return row if isinstance(row, dict) else {"_error": f"the line must be a JSON object, got {type(row).__name__}"}


def render_row(row: dict[str, Any], limits: RequestLimits | None = None) -> dict[str, Any]:
    """An input row -> the generation it asks for (prompt ids, sampling as JSON, how to parse the
    reply), or the row's error. The row is admitted as the online APIs admit a request (the same limits);
    the engine checks its prompt against the model."""
    fields = {k: _plain(v) for k, v in row.items() if v is not None}
    row_id = str(fields.pop("id", "") or "")
    rendered = {"id": row_id, "prompt_token_ids": [], "prefill_token_ids": [], "sampling": "", "stop": [],
                "harmony": False, "include_reasoning": True, "error": ""}
    try:
        if "_error" in fields:
            raise InvalidRequestError("line", fields["_error"])
        if not row_id:
            raise InvalidRequestError("id", "id must be a non-empty string or number (it names the row's result)")
        # Rendered as online chats are, with today's date in harmony's system message.
        context = AdmissionContext(limits or RequestLimits(), None, row_id,
                                   current_date=time.strftime("%Y-%m-%d", time.gmtime()))
        generation = _generation(fields, context)
    except ClientError as e:
        return rendered | {"error": f"{e.param}: {e}" if e.param and not str(e).startswith(e.param) else str(e)}
    return rendered | {
        "prompt_token_ids": list(generation.prompt_token_ids), "prefill_token_ids": list(generation.prefill_token_ids),
        "sampling": json.dumps(dataclasses.asdict(generation.sampling)), "stop": list(generation.stop),
        "harmony": generation.harmony, "include_reasoning": generation.include_reasoning}


def _generation(fields: dict[str, Any], context: AdmissionContext) -> Generation:
    if "messages" in fields:
        chat = parse_body(ChatCompletionRequest, fields)
        if chat.n != 1 or chat.stream:
            raise InvalidRequestError("n" if chat.n != 1 else "stream", "a batch row has one choice and no stream "
                                                                       "(n: 1, stream: false)")
        return prepare_chat(chat.chat_input(), context)
    if "input" in fields:  # the Responses API's request shape
        for name in ("stream", "previous_response_id"):
            if fields.get(name):
                raise InvalidRequestError(name, f"{name}: a batch row is one whole turn (no stream, no stored "
                                                f"response to continue)")
        _, generation = admit_responses_request(fields | {"store": False}, context)
        return generation
    if "prompt_token_ids" in fields:
        ids = fields.pop("prompt_token_ids")
        unknown = sorted(set(fields) - set(_SAMPLING_FIELDS))
        if unknown:
            raise InvalidRequestError(unknown[0], f"{unknown[0]}: unknown field of a token-id row (allowed: "
                                                  f"prompt_token_ids, {', '.join(_SAMPLING_FIELDS)})")
        req = parse_body(CompletionRequest, {"prompt": ids, "max_tokens": None} | fields)
        if not isinstance(req.prompt, list) or not all(isinstance(t, int) for t in req.prompt):
            raise InvalidRequestError("prompt_token_ids", "prompt_token_ids must be a list of token ids")
        # Generation stops at harmony's stop tokens, as online chats do.
        [generation] = prepare_completion(req.completion_input(), context, stop_token_ids=DEFAULT_STOP_TOKEN_IDS)
        return dataclasses.replace(generation, harmony=_ends_with_assistant_start(req.prompt))
    raise InvalidRequestError("messages", "a row needs `messages` (a chat), `input` (a Responses API request) or "
                                          "`prompt_token_ids`")


def _ends_with_assistant_start(ids: list[int]) -> bool:
    tail = [START_ID, *encode("assistant")]
    return ids[-len(tail):] == tail


def _plain(value: Any) -> Any:
    """Arrow/numpy values (Parquet rows) as plain Python: lists, dicts, ints, strings."""
    if hasattr(value, "tolist"):
        value = value.tolist()
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items() if v is not None}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


# --- generate (one actor per EP group) ---------------------------------------------------------------

class GroupGenerator:
    """A Ray Data actor owning one EP group. Each call gets a batch of rendered rows, runs them all in
    the group at once and returns when the last is done; Ray Data keeps several calls in flight per
    actor, so the group always has work while a batch's slowest row finishes."""

    def __init__(self, raw_config: dict[str, Any], run_name: str):
        from serve.config import parse_config

        self.config = parse_config(raw_config, "batch config")
        self.run_name = run_name
        self.group = None
        self._starting: asyncio.Lock | None = None
        self._ids = 0

    async def _ensure_group(self):
        """The actor's group: started on first use, restarted after a failure."""
        from cluster import EPGroup

        if self._starting is None:
            self._starting = asyncio.Lock()
        async with self._starting:
            if self.group is None:
                checkpoint = self.config.checkpoint_path()
                name = f"{GROUP_NAME_PREFIX}{self.run_name}-{os.getpid()}"
                self.group = EPGroup(self.config.group_config(checkpoint, name=name))
                logger.info("starting an EP group of %d ranks from %s", self.config.group.num_ranks, checkpoint)
                await self.group.start()
            elif self.group.health().state == "failed":
                logger.warning("the EP group failed (%s); restarting it", self.group.health().error)
                await self.group.restart()
        return self.group

    async def __call__(self, batch) -> AsyncIterator[dict[str, list]]:
        rows = batch.to_dict("records")
        results = await asyncio.gather(*(self._generate(row) for row in rows))
        yield {name: [r[name] for r in results] for name in results[0]} if results else {}

    async def _generate(self, row: dict[str, Any]) -> dict[str, Any]:
        """The row's completion. When the group fails under it, the group restarts and the row goes on
        from the tokens it had (`gateway.max_migrations` times), as an online stream moves to another
        group; a row in the step that failed the group ends with an error instead."""
        row = {k: _plain(v) for k, v in row.items()}
        out = row | {"completion_token_ids": [], "finish_reason": "", "num_prompt_tokens": len(row["prompt_token_ids"]),
                     "num_cached_tokens": 0}
        if row["error"]:
            return out
        from cluster.errors import SuspectRequestError

        stop = _StopWatch(out) if out["stop"] else None  # one for the row: its held text survives a move
        num_moves = 0
        while True:
            try:
                await self._run(await self._ensure_group(), out, stop)
                return out
            except ClientError as e:
                return out | {"error": f"{e.param}: {e}" if e.param and not str(e).startswith(e.param) else str(e)}
            except SuspectRequestError as e:
                return out | {"error": f"the EP group failed in a step of this row, which was not retried: {e}"}
            except UnavailableError as e:
                if num_moves >= self.config.gateway.max_migrations:
                    return out | {"error": f"the EP group failed {num_moves + 1} times running this row: {e}"}
                num_moves += 1
                logger.warning("row %s: the EP group failed after %d tokens; going on after its restart",
                               row["id"], len(out["completion_token_ids"]))

    async def _run(self, group, out: dict[str, Any], stop: _StopWatch | None) -> None:
        """Generates into `out`, going on from the tokens already there."""
        sampling = SamplingParams(**json.loads(out["sampling"]))
        self._ids += 1
        outputs = group.generate(f"{out['id']}#{self._ids}", out["prompt_token_ids"], sampling,
                                 resumed_token_ids=out["completion_token_ids"])
        async with contextlib.aclosing(outputs):  # leaving early aborts the request in its engine
            async for output in outputs:
                out["completion_token_ids"] += output.new_token_ids
                if not out["num_cached_tokens"]:
                    out["num_cached_tokens"] = output.num_cached_tokens
                if output.finish_reason is not None:
                    out["finish_reason"] = output.finish_reason
                elif stop is not None and stop.hit(output.new_token_ids):
                    out["finish_reason"] = "stop"
                    return


class _StopWatch:
    """Whether a stop string has appeared in the reply, so a row stops generating when online serving would."""

    def __init__(self, row: dict[str, Any]):
        self.assembler = ChoiceAssembler(0, _row_generation(row))

    def hit(self, token_ids: list[int]) -> bool:
        event = self.assembler.add(ModelChunk(tuple(token_ids), None, None, 0, 0, 0))
        return event.finish_reason == "stop"


def _row_generation(row: dict[str, Any]) -> Generation:
    return Generation(row["id"], tuple(row["prompt_token_ids"]), SamplingParams(), 1, tuple(row["stop"]),
                      harmony=row["harmony"], prefill_token_ids=tuple(row["prefill_token_ids"]),
                      include_reasoning=row["include_reasoning"])


# --- parse (CPU) -------------------------------------------------------------------------------------

def parse_row(row: dict[str, Any]) -> dict[str, Any]:
    """A generated row -> its result: text, reasoning and tool calls parsed as the online APIs do."""
    row = {k: _plain(v) for k, v in row.items()}
    result = {"id": row["id"], "text": "", "reasoning": "", "tool_calls": "[]", "finish_reason": "",
              "prompt_tokens": int(row["num_prompt_tokens"]), "completion_tokens": len(row["completion_token_ids"]),
              "cached_tokens": int(row["num_cached_tokens"]), "completion_token_ids": row["completion_token_ids"],
              "error": row["error"]}
    if row["error"]:
        return result
    assembler = ChoiceAssembler(0, _row_generation(row))
    accumulator = ChatChoiceAccumulator(0, ChatDeltaBuilder(row["include_reasoning"]), False)
    accumulator.add(assembler.add(ModelChunk(tuple(row["completion_token_ids"]), None,
                                             row["finish_reason"] or "length", result["prompt_tokens"],
                                             result["completion_tokens"], result["cached_tokens"])))
    message = accumulator.body()["message"]
    return result | {"text": message["content"] or "", "reasoning": message["reasoning"] or "",
                     "tool_calls": json.dumps(message.get("tool_calls", [])),
                     "finish_reason": accumulator.finish_reason or row["finish_reason"]}


# --- the pipeline ------------------------------------------------------------------------------------

def render(ds, jsonl: bool = False, concurrency: int = 2, limits: RequestLimits | None = None):
    """Input rows (or, with `jsonl`, a `read_text` Dataset of JSONL lines) -> rendered rows (CPU tasks)."""
    return ds.map_batches(render_batch, batch_format="pyarrow", fn_kwargs={"jsonl": jsonl, "limits": limits},
                          num_cpus=_CPU_STAGE_CPUS, concurrency=concurrency)


def generate_and_parse(rendered, config: AppConfig, run_name: str):
    """Rendered rows -> result rows: generated on `batch.num_groups` EP groups, parsed by CPU tasks."""
    import ray.data

    b = config.batch
    per_group = b.max_in_flight_per_group or 2 * config.engine.max_num_seqs * config.group.num_ranks
    # A call (a Ray Data task) takes a block and ends when its last row does; with blocks of
    # `rows_per_block(config)` rows (run_batch repartitions to them), this many calls in flight give a
    # group about `per_group` rows at once.
    calls = max(1, math.ceil(per_group / rows_per_block(config)))
    generated = rendered.map_batches(
        GroupGenerator, fn_constructor_kwargs={"raw_config": config.model_dump(), "run_name": run_name},
        batch_size=b.rows_per_batch,
        batch_format="pandas", num_cpus=b.num_cpus_per_actor,
        compute=ray.data.ActorPoolStrategy(size=b.num_groups, max_tasks_in_flight_per_actor=calls))
    return generated.map(parse_row, num_cpus=_CPU_STAGE_CPUS, concurrency=_cpu_stage_concurrency(config))


def rows_per_block(config: AppConfig) -> int:
    """Rows of the blocks handed to the groups: a few batches each, so results stream back (and reach
    parts) while the job runs, not only when a whole input file's block is done."""
    return max(config.batch.rows_per_batch, _ROWS_PER_BLOCK)


def batch_generate(ds, config: AppConfig, run_name: str = "default"):
    """The results of a Dataset of input rows (module docstring), lazily: render, generate on
    `batch.num_groups` EP groups, parse.

    The groups' placement groups outlive the Ray Data actors that own the groups (Ray ties them to
    the driver): once the results are consumed, `release_batch_groups(run_name)` frees them.

    Args:
        ds: a `ray.data.Dataset` of input rows.
        config: the app config (model, group, engine; its `batch` section sizes the pool).
        run_name: names this run's groups (letters, digits, dashes), for `release_batch_groups`.
    Returns:
        a `ray.data.Dataset` of result rows (RESULT_COLUMNS).
    """
    return generate_and_parse(render(ds, concurrency=_cpu_stage_concurrency(config), limits=config.request_limits()),
                              config, run_name)


def release_batch_groups(run_name: str | None = None) -> int:
    """Removes the placement groups of a batch run's EP groups (every run's with None); returns how
    many. The groups' rank actors ended with the Ray Data actors that owned them."""
    from ray import PlacementGroupID
    from ray.util.placement_group import PlacementGroup, placement_group_table, remove_placement_group

    prefix = GROUP_NAME_PREFIX + (f"{run_name}-" if run_name is not None else "")
    removed = 0
    for pg_id, info in placement_group_table().items():
        if info.get("name", "").startswith(prefix) and info.get("state") != "REMOVED":
            remove_placement_group(PlacementGroup(PlacementGroupID.from_hex(pg_id)))
            removed += 1
    return removed


@dataclass
class BatchSummary:
    num_rows: int  # input rows
    num_skipped: int  # already in the output (resumed)
    num_written: int  # written by this run
    num_errors: int  # of those, rows with an error
    num_output_tokens: int
    elapsed_s: float


def run_batch(config: AppConfig, input_path: str, output_dir: str, output_format: str = "jsonl",
              progress: TextIO = sys.stderr, flush_rows: int = 256, flush_s: float = 10.0) -> BatchSummary:
    """`gptoss-serve batch`: every input row not yet in `output_dir` -> its result row there.

    Results go into `output_dir` as parts (`part-<time>-<n>.jsonl` or `.parquet`), each written to a
    temporary name and renamed when complete, so a crash never leaves a partial part; a rerun skips
    the ids the parts hold.
    """
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    for stale in out.glob(".part-*.tmp"):
        stale.unlink()
    done = read_done_ids(out)
    source, jsonl = read_input(input_path)
    num_rows = source.count()
    pending = render(source, jsonl, _cpu_stage_concurrency(config), config.request_limits())
    if done:
        pending = pending.filter(lambda row: row["id"] not in done)
    num_pending = pending.count() if done else num_rows
    pending = pending.repartition(max(1, math.ceil(num_pending / rows_per_block(config))))
    summary = BatchSummary(num_rows, num_rows - num_pending, 0, 0, 0, 0.0)
    print(f"batch: {num_rows} rows in {input_path}, {summary.num_skipped} already in {out}, "
          f"{num_pending} to run on {config.batch.num_groups} EP group(s)", file=progress, flush=True)
    writer = PartWriter(out, output_format)
    run_name = f"{time.strftime('%Y%m%d%H%M%S')}-{os.getpid()}"
    start = time.monotonic()
    meter = _Progress(num_pending, progress)
    last_flush = time.monotonic()
    try:
        if num_pending:
            results = generate_and_parse(pending, config, run_name)
            # No prefetching: a finished block is written at once, not held until the next one is ready.
            for batch in results.iter_batches(batch_size=None, batch_format="pandas", prefetch_batches=0):
                rows = batch.to_dict("records")
                writer.add(rows)
                summary.num_written += len(rows)
                summary.num_errors += sum(1 for r in rows if r["error"])
                summary.num_output_tokens += sum(int(r["completion_tokens"]) for r in rows)
                if writer.num_buffered >= flush_rows or time.monotonic() - last_flush > flush_s:
                    writer.flush()
                    last_flush = time.monotonic()
                meter.update(summary.num_written, summary.num_output_tokens)
    finally:
        writer.flush()  # whatever finished, also on Ctrl-C
        summary.elapsed_s = time.monotonic() - start
        meter.done(summary)
        release_batch_groups(run_name)
    return summary


def read_input(path: str):
    """(Dataset, whether its rows are JSONL lines): Parquet (`.parquet`, or a folder of them) as rows;
    anything else as JSONL lines, parsed one by one in `render` (so one bad line is one error row,
    and rows need not share one schema)."""
    import ray.data

    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"{path}: no such input file or folder")
    if p.suffix == ".parquet" or (p.is_dir() and any(p.glob("*.parquet"))):
        return ray.data.read_parquet(str(p)), False
    return ray.data.read_text(str(p)).filter(lambda row: bool(row["text"].strip())), True


def read_done_ids(out: Path) -> set[str]:
    """The ids the output folder's complete parts hold."""
    done: set[str] = set()
    for part in sorted(out.glob("part-*.jsonl")):
        with part.open() as f:
            done.update(str(json.loads(line)["id"]) for line in f if line.strip())
    parquet_parts = sorted(out.glob("part-*.parquet"))
    if parquet_parts:
        import pyarrow.parquet as pq

        for part in parquet_parts:
            done.update(str(i) for i in pq.read_table(part, columns=["id"]).column("id").to_pylist())
    done.discard("")  # rows without an id are retried (they fail again at once)
    return done


class PartWriter:
    """Buffers result rows and writes them as one more part, atomically (a temporary name, then rename)."""

    def __init__(self, out: Path, output_format: str):
        if output_format not in ("jsonl", "parquet"):
            raise ValueError(f"output_format must be jsonl or parquet, got {output_format!r}")
        self.out, self.format = out, output_format
        self._rows: list[dict[str, Any]] = []
        self._stamp = time.strftime("%Y%m%dT%H%M%S")
        self._parts = 0

    @property
    def num_buffered(self) -> int:
        return len(self._rows)

    def add(self, rows: Iterable[dict[str, Any]]) -> None:
        self._rows += [{k: _plain(r[k]) for k in RESULT_COLUMNS} for r in rows]

    def flush(self) -> None:
        if not self._rows:
            return
        name = f"part-{self._stamp}-{os.getpid()}-{self._parts:05d}.{self.format}"
        tmp = self.out / f".{name}.tmp"
        if self.format == "jsonl":
            with tmp.open("w") as f:
                f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in self._rows)
                f.flush()
                os.fsync(f.fileno())
        else:
            import pyarrow as pa
            import pyarrow.parquet as pq

            pq.write_table(pa.Table.from_pylist(self._rows), tmp)
        tmp.rename(self.out / name)
        self._rows, self._parts = [], self._parts + 1


class _Progress:
    """Rows done of total, output tokens/s and an ETA on the console, every few seconds."""

    def __init__(self, total: int, stream: TextIO, period_s: float = 2.0):
        self.total, self.stream, self.period_s = total, stream, period_s
        self.start = self.last = time.monotonic()

    def update(self, rows: int, tokens: int) -> None:
        now = time.monotonic()
        if now - self.last < self.period_s:
            return
        self.last = now
        elapsed = now - self.start
        eta = (self.total - rows) * elapsed / rows if rows else float("nan")
        print(f"batch: {rows}/{self.total} rows ({100 * rows / max(1, self.total):.0f}%), "
              f"{tokens / elapsed:.0f} output tokens/s, ETA {_duration(eta)}", file=self.stream, flush=True)

    def done(self, summary: BatchSummary) -> None:
        rate = summary.num_output_tokens / summary.elapsed_s if summary.elapsed_s else 0.0
        print(f"batch: wrote {summary.num_written} rows ({summary.num_errors} with errors), "
              f"{summary.num_output_tokens} output tokens in {summary.elapsed_s:.1f} s ({rate:.0f}/s); "
              f"{summary.num_skipped} were already done", file=self.stream, flush=True)


def _duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    minutes, s = divmod(int(seconds), 60)
    return f"{minutes}m{s:02d}s" if minutes else f"{s}s"

