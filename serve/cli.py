"""`gptoss-serve`: the command line."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
DEFAULT_PRESET = "tiny"


def default_checkpoint_dir() -> Path:
    """The embedded default model: a random-weight `tiny` checkpoint in the release layout, written
    once under $GPTOSS_CACHE_DIR (no model hub is needed to try the system)."""
    from gptoss.tokenizer import read_vocab_env

    path = read_vocab_env().cache_dir.parent / "models" / f"{DEFAULT_PRESET}-seed0"
    if not (path / "config.json").exists():
        from gptoss import write_random_checkpoint

        logging.info("writing the embedded default model (%s preset, random weights) to %s", DEFAULT_PRESET, path)
        tmp = path.with_name(path.name + f".tmp{os.getpid()}")
        write_random_checkpoint(tmp, DEFAULT_PRESET, seed=0)
        tmp.rename(path)
    return path


def cmd_checkpoint(args: argparse.Namespace) -> int:
    from gptoss import write_random_checkpoint

    start = time.perf_counter()
    out = write_random_checkpoint(args.out, args.preset, seed=args.seed, layout=args.layout)
    print(f"wrote a random {args.preset} checkpoint ({args.layout} layout, seed {args.seed}) to {out} "
          f"in {time.perf_counter() - start:.1f} s")
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from gptoss import load_model
    from gptoss.generate import generate_tokens
    from gptoss.harmony import ChatMessage, StreamingParser, render_prompt
    from gptoss.tokenizer import decode

    checkpoint = args.checkpoint or default_checkpoint_dir()
    if not args.checkpoint:
        print(f"(no --checkpoint: using the embedded default model, random weights, at {checkpoint})",
              file=sys.stderr)
    model = load_model(checkpoint, dtype=DTYPES[args.dtype], device=args.device)
    messages = ([ChatMessage("system", args.system)] if args.system else []) + [ChatMessage("user", args.prompt)]
    prompt_ids = render_prompt(messages, reasoning_effort=args.reasoning_effort)
    parser = StreamingParser()
    start = time.perf_counter()
    completion_ids: list[int] = []
    for token in generate_tokens(model, prompt_ids, args.max_tokens, temperature=args.temperature,
                                 top_p=args.top_p, seed=args.seed):
        parser.feed(token)
        completion_ids.append(token)
    parser.finish()
    num_tokens = len(completion_ids)
    elapsed = time.perf_counter() - start
    result = parser.result()
    if args.show_analysis:
        print(f"[analysis]\n{result.analysis}\n")
    for call in result.tool_calls:
        print(f"[tool call] {call.name}({call.arguments})")
    if result.final or result.tool_calls:
        print(result.final)
    else:  # e.g. a random-weight model, which does not speak harmony
        print(f"(no harmony final message; the raw completion is)\n{decode(completion_ids)!r}")
    note = " (stopped by max_tokens)" if result.truncated else ""
    print(f"\n{len(prompt_ids)} prompt tokens, {num_tokens} generated in {elapsed:.2f} s "
          f"({num_tokens / elapsed:.1f} tokens/s){note}", file=sys.stderr)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gptoss-serve", description="Serve gpt-oss on Ray.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("checkpoint", help="write a random-weight checkpoint in the released layout")
    p.add_argument("--preset", default="tiny", help="tiny, small, gpt-oss-20b or gpt-oss-120b")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--layout", choices=("hf", "original"), default="hf")
    p.set_defaults(func=cmd_checkpoint)

    p = sub.add_parser("generate", help="chat with the model from the command line")
    p.add_argument("--checkpoint", help="checkpoint folder (default: the embedded random tiny model)")
    p.add_argument("--prompt", default="What is the capital of France?", help="the user message")
    p.add_argument("--system", help="system (developer) instructions")
    p.add_argument("--reasoning-effort", choices=("low", "medium", "high"), default="medium")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 is greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16")
    p.add_argument("--device", default="cpu")
    p.add_argument("--show-analysis", action="store_true", help="also print the analysis channel")
    p.set_defaults(func=cmd_generate)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"gptoss-serve {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
