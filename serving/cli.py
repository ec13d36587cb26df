"""The `deltaserve` command. Flags are parsed here and only here; the work is done by the packages."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from registry.errors import DeltaError


class CliError(Exception):
    """A user error: printed as `deltaserve: error: ...`, exit status 2."""


def _add_engine_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"], default="auto")
    p.add_argument("--max-model-len", type=int, default=None, help="prompt + output tokens (default: the model's)")
    p.add_argument("--max-num-seqs", type=int, default=64, help="sequences in one step")
    p.add_argument("--bitdelta-slots", type=int, default=4, help="GPU slots for 1-bit deltas")
    p.add_argument("--lora-slots", type=int, default=8, help="GPU slots for LoRA adapters")
    p.add_argument("--max-lora-rank", type=int, default=64)
    p.add_argument("--kernel-backend", choices=["auto", "triton", "torch"], default="auto")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="deltaserve", description="Serve many fine-tunes of one base model.")
    sub = parser.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="offline generation, no server")
    g.add_argument("--model", required=True, help="local Hugging Face directory of the base model")
    g.add_argument("--adapter", default=None, help="a PEFT LoRA directory or a 1-bit delta file")
    src = g.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="the prompt text")
    src.add_argument("--requests", type=Path, help="JSONL file of requests, run together as mixed batches")
    g.add_argument("--max-tokens", type=int, default=64)
    g.add_argument("--temperature", type=float, default=1.0, help="0 = greedy")
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--json", action="store_true", help="print one JSON object per request")
    _add_engine_flags(g)
    return parser


def _engine_config(args: argparse.Namespace, max_num_batched_tokens: int | None = None):
    from serving.engine.config import EngineConfig

    return EngineConfig(
        device=args.device,
        dtype=args.dtype,
        max_model_len=args.max_model_len,
        max_num_seqs=args.max_num_seqs,
        bitdelta_slots=args.bitdelta_slots,
        lora_slots=args.lora_slots,
        max_lora_rank=args.max_lora_rank,
        kernel_backend=args.kernel_backend,
        **({"max_num_batched_tokens": max_num_batched_tokens} if max_num_batched_tokens else {}),
    )


_REQUEST_KEYS = {"prompt", "adapter", "max_tokens", "temperature", "seed", "top_p", "top_k", "stop"}


def _read_requests(path: Path, args: argparse.Namespace) -> list[dict[str, Any]]:
    if not path.is_file():
        raise CliError(f"--requests: no such file: {path}")
    requests = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            req = json.loads(line)
        except json.JSONDecodeError as e:
            raise CliError(f"{path}:{lineno}: not JSON: {e.msg}") from None
        if not isinstance(req, dict) or not isinstance(req.get("prompt"), str):
            raise CliError(f'{path}:{lineno}: each line must be an object with a string "prompt"')
        unknown = set(req) - _REQUEST_KEYS
        if unknown:
            raise CliError(f"{path}:{lineno}: unknown field(s): {', '.join(sorted(unknown))}")
        requests.append(
            {
                "prompt": req["prompt"],
                "adapter": req.get("adapter"),
                "max_tokens": req.get("max_tokens", args.max_tokens),
                "temperature": req.get("temperature", args.temperature),
                "seed": req.get("seed", args.seed),
                "top_p": req.get("top_p", args.top_p),
                "top_k": req.get("top_k", args.top_k),
                "stop": req.get("stop") or [],
                "where": f"{path}:{lineno}",
            }
        )
    if not requests:
        raise CliError(f"{path}: no requests")
    return requests


def cmd_generate(args: argparse.Namespace) -> int:
    from registry.loading import load_delta
    from serving.engine.engine import LLMEngine
    from serving.engine.sampling_params import SamplingParams, SamplingParamsError
    from serving.models.config import UnsupportedModel

    if args.requests is not None:
        requests = _read_requests(args.requests, args)
    else:
        requests = [
            {
                "prompt": args.prompt,
                "adapter": args.adapter,
                "max_tokens": args.max_tokens,
                "temperature": args.temperature,
                "seed": args.seed,
                "top_p": args.top_p,
                "top_k": args.top_k,
                "stop": [],
                "where": "--prompt",
            }
        ]
    try:
        engine = LLMEngine.from_model_dir(args.model, _engine_config(args))
    except (UnsupportedModel, DeltaError, FileNotFoundError, ValueError) as e:
        raise CliError(f"--model {args.model}: {e}") from None

    deltas: dict[str, Any] = {}  # each distinct adapter path is loaded once
    batch = []
    for req in requests:
        adapter = req["adapter"]
        if adapter is not None and adapter not in deltas:
            try:
                deltas[adapter] = load_delta(adapter, engine.spec, engine.config.max_lora_rank)
            except (DeltaError, FileNotFoundError) as e:
                raise CliError(f"{req['where']}: adapter {adapter}: {e}") from None
        try:
            params = SamplingParams(
                max_tokens=req["max_tokens"],
                temperature=req["temperature"],
                top_p=req["top_p"],
                top_k=req["top_k"],
                seed=req["seed"],
                stop=req["stop"],
            )
        except (SamplingParamsError, TypeError) as e:
            raise CliError(f"{req['where']}: {e}") from None
        batch.append((req["prompt"], params, deltas.get(adapter) if adapter else None))
    try:
        completions = engine.generate(batch)
    except (SamplingParamsError, DeltaError) as e:
        raise CliError(str(e)) from None
    for c in completions:
        if args.json:
            print(json.dumps({"text": c.text, "token_ids": c.token_ids}, ensure_ascii=False))
        else:
            print(c.text)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.command == "generate":
            return cmd_generate(args)
    except CliError as e:
        print(f"deltaserve: error: {e}", file=sys.stderr)
        return 2
    parser.error(f"unknown command {args.command}")
    return 2


if __name__ == "__main__":
    sys.exit(main())
