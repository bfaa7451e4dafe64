"""Admission workers: child processes of a gateway replica that turn request bytes into generations
(the `admit_*` functions of serve/openai_protocol.py and serve/grpc_protocol.py), so that parsing,
validating, rendering and tokenizing never run on the replica's event loop, where every stream's
tokens pass.

Processes, not threads: openai-harmony renders and tokenizes holding the GIL (measured: a thread
rendering a long chat stalls the loop for the whole render), and its tokenizer is quadratic in the
length of a run of characters without a break (70,000 letters: ~2 s), so one hostile request would
stall every stream of the replica. A job that runs past `timeout_s` has its worker killed and replaced,
and its request is refused (`gateway.admission_timeout_s`).

Parent and child speak over the child's stdin/stdout: length-prefixed pickles of (function path,
arguments) one way and (ok, result or exception) the other. Both ends are this package; request bytes
travel as bytes and are parsed by the child, so nothing a client sent is unpickled.
"""

from __future__ import annotations

import asyncio
import importlib
import logging
import os
import pickle
import select
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from gptoss.errors import ClientError, GptossError, ServerError

logger = logging.getLogger("ray.serve")

_HEADER = struct.Struct("!Q")
# Imported by a child before its first job, so that no request pays for them.
_WARM_MODULES = ("serve.openai_protocol", "serve.grpc_protocol")


class AdmissionTimeoutError(ClientError):
    """The request could not be admitted within the admission timeout (it takes too long to render)."""

    http_status = 413
    grpc_code = "RESOURCE_EXHAUSTED"


class AdmissionWorkers:
    """`await run(function, *args)`: `function(*args)` in one of `num_workers` child processes (started
    now, replaced when one dies or runs past `timeout_s`); with `num_workers` 0, on the caller's thread."""

    def __init__(self, num_workers: int, timeout_s: float):
        self.num_workers, self.timeout_s = num_workers, timeout_s
        self._workers = [_Worker() for _ in range(num_workers)]
        self._idle: asyncio.Queue | None = None
        self._threads = ThreadPoolExecutor(max(1, num_workers), thread_name_prefix="admission")
        for worker in self._workers:
            worker.start()  # the child imports and warms up while the replica finishes starting

    async def run(self, function: Callable, *args: Any) -> Any:
        """The function's result, or the exception it raised (client errors as they are; anything else
        as a ServerError, logged).

        Raises:
            AdmissionTimeoutError past `timeout_s` of the worker's time (waiting for a worker excluded).
        """
        if not self._workers:
            return function(*args)
        if self._idle is None:
            self._idle = asyncio.Queue()
            for worker in self._workers:
                self._idle.put_nowait(worker)
        path = f"{function.__module__}:{function.__qualname__}"
        worker = await self._idle.get()
        job = asyncio.get_running_loop().run_in_executor(self._threads, worker.call, path, args, self.timeout_s)
        # The worker is free again when its job is done, also when the caller left before that.
        job.add_done_callback(lambda _: self._idle.put_nowait(worker))
        ok, value = await asyncio.shield(job)
        if ok:
            return value
        raise value

    def close(self) -> None:
        for worker in self._workers:
            worker.stop()
        self._threads.shutdown(wait=False, cancel_futures=True)


class _Worker:
    """One child process; `call` runs on one thread at a time (the pool hands a worker to one caller)."""

    def __init__(self) -> None:
        self._process: subprocess.Popen | None = None
        self._lock = threading.Lock()

    def start(self) -> None:
        with self._lock:
            if self._process is None or self._process.poll() is not None:
                self._process = _spawn()

    def stop(self) -> None:
        with self._lock:
            if self._process is not None:
                self._process.kill()
                self._process.wait()
                self._process = None

    def call(self, path: str, args: tuple, timeout_s: float) -> tuple[bool, Any]:
        self.start()
        process = self._process
        deadline = time.monotonic() + timeout_s
        try:
            _write_frame(process.stdin, pickle.dumps((path, args), protocol=pickle.HIGHEST_PROTOCOL))
            reply = _read_frame(process.stdout.fileno(), deadline)
        except TimeoutError:
            self.stop()
            logger.warning("admission: a request ran past %g s in its worker; the worker was replaced", timeout_s)
            return False, AdmissionTimeoutError(
                f"the request could not be admitted within {timeout_s:g} s (gateway.admission_timeout_s): "
                "rendering it takes too long (e.g. very long runs of characters without spaces or punctuation "
                "tokenize slowly)")
        except (OSError, EOFError) as e:
            code = process.poll()
            self.stop()
            logger.error("admission: the worker process died (exit code %s, %s); starting a new one", code, e)
            return False, ServerError("the admission worker failed")
        return pickle.loads(reply)


def _spawn() -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    # stderr is the replica's: a child's log lines and tracebacks land in the replica's log.
    return subprocess.Popen([sys.executable, "-m", "serve.admission_workers"], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, env=env, close_fds=True)


def _write_frame(stream, data: bytes) -> None:
    stream.write(_HEADER.pack(len(data)))
    stream.write(data)
    stream.flush()


def _read_frame(fd: int, deadline: float | None = None) -> bytes:
    """One frame from `fd`. Raises TimeoutError past `deadline`, EOFError when the other end closed."""
    header = _read_exactly(fd, _HEADER.size, deadline)
    return _read_exactly(fd, _HEADER.unpack(header)[0], deadline)


def _read_exactly(fd: int, size: int, deadline: float | None) -> bytes:
    parts, remaining = [], size
    while remaining:
        if deadline is not None:
            wait_s = deadline - time.monotonic()
            if wait_s <= 0 or not select.select([fd], [], [], wait_s)[0]:
                raise TimeoutError
        part = os.read(fd, min(remaining, 1 << 20))
        if not part:
            raise EOFError("the other end closed the pipe")
        parts.append(part)
        remaining -= len(part)
    return b"".join(parts)


def _resolve(path: str) -> Callable:
    module, _, name = path.partition(":")
    if not module.startswith("serve."):
        raise ServerError(f"admission workers run serve.* functions only, not {path!r}")
    return getattr(importlib.import_module(module), name)


def _serve_jobs() -> None:
    """The child's loop: one job at a time until the parent closes the pipe."""
    requests = sys.stdin.buffer.fileno()
    replies = os.fdopen(os.dup(sys.stdout.fileno()), "wb")
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())  # a stray print must not corrupt the replies
    for module in _WARM_MODULES:
        importlib.import_module(module)
    from gptoss.tokenizer import get_encoding

    get_encoding()
    while True:
        try:
            path, args = pickle.loads(_read_frame(requests))
        except EOFError:
            return
        try:
            reply = (True, _resolve(path)(*args))
        except GptossError as e:
            reply = (False, e)
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as e:  # noqa: BLE001 - a bug (or a Rust panic): logged here, a server error to the caller
            logging.getLogger(__name__).exception("admission job %s failed", path)
            reply = (False, ServerError(f"admission failed ({type(e).__name__})"))
        _write_frame(replies, pickle.dumps(reply, protocol=pickle.HIGHEST_PROTOCOL))


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING, format="admission worker: %(levelname)s %(name)s: %(message)s")
    _serve_jobs()
