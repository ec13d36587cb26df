"""The `deltaserve` command. Flags are parsed here and only here; the work is done by the packages. Over 400
lines: one concept, the command line — each subcommand's flags and the few lines that hand them to its package
(or, for the client commands, to the server through serving.client) and print the answer."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, get_args

from registry.errors import DeltaError
from registry.upload_formats import FORMATS
from serving.engine.config import EngineOptions, KernelBackend
from serving.flags import add_flags, given_flags, settings_error
from serving.server import ServerSettings


class CliError(Exception):
    """A user error: printed as `deltaserve: error: ...`, exit status 2."""


def _add_client_flags(p: argparse.ArgumentParser, key_env: str) -> None:
    p.add_argument("--url", default=None, help="server URL (default: $DELTASERVE_URL, else http://127.0.0.1:8000)")
    p.add_argument("--key", default=None, help=f"API key (default: ${key_env})")
    p.set_defaults(key_env=key_env)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="deltaserve", description="Serve many fine-tunes of one base model.")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_generate_parser(sub)
    _add_compress_parser(sub)
    _add_eval_parser(sub)
    s = sub.add_parser("serve", help="run the HTTP server (the embedded demo without --model)")
    add_flags(s, ServerSettings, ServerSettings.model_fields, defaults=False)  # unset: DELTASERVE_* variables
    _add_tenants_parser(sub)
    _add_adapters_parser(sub)
    _add_usage_parser(sub)
    adm = sub.add_parser("admin", help="local administration of a registry folder (no server)")
    admsub = adm.add_subparsers(dest="action", required=True)
    a = admsub.add_parser("reset-key", help="replace a lost admin key with a new one, printed once (stop the server first)")
    a.add_argument("--registry", type=Path, default=ServerSettings.model_fields["registry"].default)
    a.add_argument("--catalog", metavar="URL", default=None,
                   help="the registry's catalog, as given to `serve --catalog` (default: SQLite in the folder)")
    a.add_argument("--blob-store", metavar="URL", default=None,
                   help="the registry's blob store, as given to `serve --blob-store` (default: the folder's blobs/)")
    return parser


def _add_generate_parser(sub: argparse._SubParsersAction) -> None:
    g = sub.add_parser("generate", help="offline generation, no server")
    g.add_argument("--model", default=None, help="local Hugging Face directory of the base model (default: the demo)")
    g.add_argument("--adapter", default=None, help="a PEFT LoRA directory or a 1-bit delta file")
    g.add_argument("--tenant", default=None, help="a demo tenant's fine-tune (german, spanish, bofh, italian); demo only")
    src = g.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="the prompt text")
    src.add_argument("--requests", type=Path, help="JSONL file of requests, run together as mixed batches")
    g.add_argument("--max-tokens", type=int, default=64)
    g.add_argument("--temperature", type=float, default=1.0, help="0 = greedy")
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--json", action="store_true", help="print one JSON object per request")
    add_flags(g, EngineOptions, EngineOptions.model_fields, defaults=True)


def _add_tenants_parser(sub: argparse._SubParsersAction) -> None:
    t = sub.add_parser("tenants", help="manage tenants (admin key)")
    tsub = t.add_subparsers(dest="action", required=True)
    for action, helptext in (("create", "create a tenant and print its API key"), ("ls", "list tenants"),
                             ("rm", "delete a tenant and its adapters")):
        a = tsub.add_parser(action, help=helptext)
        if action != "ls":
            a.add_argument("name")
        _add_client_flags(a, "DELTASERVE_ADMIN_KEY")


def _add_adapters_parser(sub: argparse._SubParsersAction) -> None:
    ad = sub.add_parser("adapters", help="manage your adapters (tenant key)")
    asub = ad.add_subparsers(dest="action", required=True)
    a = asub.add_parser("push", help="upload a LoRA directory, a 1-bit delta file or a full fine-tune directory")
    a.add_argument("path", type=Path)
    a.add_argument("--name", required=True)
    a.add_argument("--format", required=True, choices=FORMATS)
    _add_recipe_flags(a)
    _add_client_flags(a, "DELTASERVE_API_KEY")
    a = asub.add_parser("ls", help="list your adapters")
    _add_client_flags(a, "DELTASERVE_API_KEY")
    a = asub.add_parser("show", help="one adapter: its current version, status, progress, error")
    a.add_argument("name")
    _add_client_flags(a, "DELTASERVE_API_KEY")
    a = asub.add_parser("rm", help="delete an adapter (all versions)")
    a.add_argument("name")
    _add_client_flags(a, "DELTASERVE_API_KEY")
    a = asub.add_parser("recompress", help="a new version of a fine-tune, compressed again from its kept upload")
    a.add_argument("name")
    _add_recipe_flags(a)
    _add_client_flags(a, "DELTASERVE_API_KEY")
    a = asub.add_parser("pull", help="download the files of an adapter's current version as they were uploaded "
                        "(a full fine-tune: its config.json and safetensors files, byte-identical)")  # fmt: skip
    a.add_argument("name")
    a.add_argument("--out", type=Path, required=True, help="folder to write the files into (made if missing)")
    _add_client_flags(a, "DELTASERVE_API_KEY")


def _add_recipe_flags(a: argparse.ArgumentParser) -> None:
    """How the server compresses a full fine-tune (push --format finetune, recompress)."""
    a.add_argument("--scale", choices=["per-matrix", "per-row"], default=None, help="1-bit scales (server default: per-matrix)")
    a.add_argument("--distill-steps", type=int, default=None, help="scale-distillation steps on --calibration text")
    a.add_argument("--calibration", type=Path, default=None, help="UTF-8 text of the tenant's domain: 80 %% distils "
                   "the scales, the rest measures the version's fidelity (shown by adapters show)")  # fmt: skip


def _recipe_of(args: argparse.Namespace) -> tuple[dict, str | None]:
    """(the form or JSON fields of --scale / --distill-steps, the --calibration text or None)."""
    fields = {k: v for k, v in (("scale", args.scale), ("distill_steps", args.distill_steps)) if v is not None}
    text = None
    if args.calibration is not None:
        try:
            text = args.calibration.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise CliError(f"--calibration {args.calibration}: {e}") from None
    return fields, text


def _add_usage_parser(sub: argparse._SubParsersAction) -> None:
    u = sub.add_parser("usage", help="requests and tokens per model and period (tenant key: yours; admin key: all)")
    u.add_argument("--by", choices=["day", "hour"], default="day", help="periods of one UTC day or hour (default: day)")
    u.add_argument("--since", default=None, help="from this UTC time: 2026-12-01, 2026-12-01T09:00 or unix seconds "
                   "(default: 31 days or 48 hours back)")  # fmt: skip
    u.add_argument("--until", default=None, help="up to this UTC time, not included (default: now)")
    u.add_argument("--model", default=None, help="only this model (an adapter's name, or the base's id)")
    u.add_argument("--tenant", default=None, help="only this tenant (admin key)")
    u.add_argument("--json", action="store_true", help="print the server's JSON report")
    _add_client_flags(u, "DELTASERVE_API_KEY")  # else $DELTASERVE_ADMIN_KEY


def _add_distill_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--calibration", type=Path, default=None, help="text file for scale distillation")
    p.add_argument("--distill-steps", type=int, default=None,
                   help="scale-distillation steps (default: 200 with --calibration, else none)")
    p.add_argument("--distill-lr", type=float, default=1e-4, help="Adam learning rate of the scales")
    p.add_argument("--distill-loss", choices=["mse", "kl"], default="mse", help="logit MSE (the paper's) or KL")
    p.add_argument("--seq-len", type=int, default=128, help="calibration tokens per chunk")
    p.add_argument("--batch-size", type=int, default=4, help="calibration chunks per step")
    p.add_argument("--scale", choices=["per-matrix", "per-row"], default="per-matrix",
                   help="one scale per projection (mean|delta|, the paper's) or one per output row")
    p.add_argument("--other-tensors", choices=["exact", "half"], default="exact",
                   help="changed non-projection tensors (norms, embeddings, lm_head, biases): stored exactly, "
                        "or in 16 bits leaving negligible changes out")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="where distillation runs")


def _add_compress_parser(sub) -> None:
    c = sub.add_parser("compress", help="a full fine-tune -> a 1-bit delta file (BitDelta)")
    c.add_argument("--base", required=True, type=Path, help="the base model's Hugging Face directory")
    c.add_argument("--finetune", required=True, type=Path, help="the fine-tune's Hugging Face directory")
    c.add_argument("--out", required=True, type=Path, help="the 1-bit delta file to write (.safetensors)")
    c.add_argument("--json", action="store_true", help="print a JSON summary")
    _add_distill_flags(c)


def _add_eval_parser(sub) -> None:
    e = sub.add_parser("eval", help="perplexity and gain kept of a tenant's forms on held-out text")
    e.add_argument("--tenant", default=None, help="a demo tenant (german, spanish, bofh, italian): all inputs from the demo")
    e.add_argument("--base", type=Path, default=None, help="the base model's Hugging Face directory")
    e.add_argument("--finetune", type=Path, default=None, help="the full fine-tune's Hugging Face directory")
    e.add_argument("--text", type=Path, default=None, help="held-out text file")
    e.add_argument("--delta", type=Path, default=None, help="a 1-bit delta file (the distilled form)")
    e.add_argument("--lora", type=Path, default=None, help="a PEFT LoRA directory of the same fine-tune")
    e.add_argument("--max-tokens", type=int, default=4096, help="tokens of the text evaluated")
    e.add_argument("--window", type=int, default=256, help="tokens per scored window")
    e.add_argument("--kernel-backend", choices=list(get_args(KernelBackend)), default="auto")
    e.add_argument("--json", action="store_true", help="print one JSON object")
    _add_distill_flags(e)


def _read_text(path: Path, flag: str) -> str:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise CliError(f"{flag} {path}: {e}") from None
    if not text.strip():
        raise CliError(f"{flag} {path}: the file is empty")
    return text


def _distill_args(args: argparse.Namespace):
    """(DistillConfig or None, calibration text or None) from the flags; CliError for inconsistent ones."""
    from registry.distill import DistillConfig

    steps = args.distill_steps
    if steps is None:
        steps = 200 if args.calibration is not None else 0
    if steps < 0:
        raise CliError("--distill-steps must be >= 0")
    if steps > 0 and args.calibration is None:
        raise CliError("--distill-steps needs --calibration FILE (text for scale distillation)")
    if steps == 0:
        return None, None
    from serving.models.loader import resolve_device

    text = _read_text(args.calibration, "--calibration")
    try:
        config = DistillConfig(steps=steps, lr=args.distill_lr, seq_len=args.seq_len, batch_size=args.batch_size,
                               loss=args.distill_loss, device=resolve_device(args.device).type)  # fmt: skip
    except ValueError as e:
        raise CliError(str(e)) from None
    return config, text


def cmd_compress(args: argparse.Namespace) -> int:
    from registry.compress import CompressOptions, compress, describe

    distill, calibration = _distill_args(args)
    if args.device == "cuda":
        from serving.models.loader import resolve_device

        try:
            resolve_device("cuda")
        except ValueError as e:
            raise CliError(str(e)) from None
    try:
        result = compress(args.base, args.finetune, args.out, CompressOptions(args.scale, args.other_tensors),
                          distill=distill, calibration_text=calibration)  # fmt: skip
    except (DeltaError, ValueError, OSError) as e:
        raise CliError(str(e)) from None
    summary = describe(result)
    if args.json:
        print(json.dumps(summary))
    else:
        print(f"wrote {result.path} ({result.size_bytes} bytes, sha256 {result.sha256}): {result.num_projections} "
              f"projections as sign + {args.scale} scale, {len(result.replacements)} replaced tensor(s), "
              f"{len(result.identical)} identical tensor(s) skipped")  # fmt: skip
        if result.distill is not None:
            d = result.distill
            print(f"distillation: {d.steps} steps, {d.loss} logit error {d.loss_before:.4g} -> {d.loss_after:.4g} "
                  f"({d.kept} scales kept)")  # fmt: skip
    return 0


@dataclass(frozen=True)
class _EvalInputs:
    base: Path
    finetune: Path
    text: str
    delta: Path | None  # a 1-bit delta file to evaluate instead of compressing the fine-tune
    lora: Path | None


def _demo_eval_inputs(args: argparse.Namespace, tmp: Path) -> _EvalInputs:
    """--tenant NAME: the demo base, the tenant's full fine-tune (a LoRA tenant's is its LoRA merged into the
    base), its held-out text, its shipped 1-bit delta or LoRA."""
    from serving.demo import demo_dir, demo_tenants, read_heldout
    from serving.evaluation import merge_lora

    if any(getattr(args, k) is not None for k in ("base", "finetune", "text", "lora")):
        raise CliError("--tenant takes every input from the demo: drop --base, --finetune, --text and --lora")
    tenants = {t.name: t for t in demo_tenants()}
    t = tenants.get(args.tenant)
    if t is None:
        raise CliError(f"--tenant {args.tenant}: not a demo tenant ({', '.join(tenants)})")
    base = demo_dir() / "base"
    text = "\n".join(read_heldout(t.heldout_path))
    if t.kind == "lora":
        merge_lora(base, t.adapter_path, tmp)
        return _EvalInputs(base, tmp, text, args.delta, t.adapter_path)
    shipped = t.adapter_path.is_file() and args.distill_steps is None and args.calibration is None
    delta = args.delta if args.delta is not None or not shipped else t.adapter_path
    return _EvalInputs(base, t.finetune_path, text, delta, None)


def cmd_eval(args: argparse.Namespace) -> int:
    import tempfile

    from registry.compress import CompressOptions
    from serving.evaluation import evaluate

    with tempfile.TemporaryDirectory(prefix="deltaserve-eval-") as tmp:
        if args.tenant is not None:
            inputs = _demo_eval_inputs(args, Path(tmp))
        else:
            missing = [f"--{k}" for k in ("base", "finetune", "text") if getattr(args, k) is None]
            if missing:
                raise CliError(f"give --tenant NAME, or {', '.join(missing)}")
            inputs = _EvalInputs(args.base, args.finetune, _read_text(args.text, "--text"), args.delta, args.lora)
        distill, calibration = _distill_args(args)
        if args.delta is not None and distill is not None:
            raise CliError("give --delta FILE or --distill-steps/--calibration, not both")
        try:
            report = evaluate(inputs.base, inputs.finetune, inputs.text, delta_path=inputs.delta, lora_dir=inputs.lora,
                              distill=distill,
                              calibration_text=calibration, options=CompressOptions(args.scale, args.other_tensors),
                              max_tokens=args.max_tokens, window=args.window, device=args.device,
                              kernel_backend=args.kernel_backend)  # fmt: skip
        except (DeltaError, ValueError, OSError) as e:
            raise CliError(str(e)) from None
    print(json.dumps(report.as_dict()) if args.json else report.table())
    return 0


def _engine_config(args: argparse.Namespace):
    from pydantic import ValidationError

    from serving.engine.config import EngineConfig

    try:
        return EngineConfig(**given_flags(args, EngineOptions))
    except ValidationError as e:
        raise CliError(settings_error(e)) from None


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
    from registry.model_config import UnsupportedModel
    from serving.engine.engine import LLMEngine
    from serving.engine.sampling_params import SamplingParamsError

    model, adapter = _generate_source(args)
    if args.requests is not None:
        requests = _read_requests(args.requests, args)
    else:
        requests = [{"prompt": args.prompt, "adapter": adapter, "max_tokens": args.max_tokens,
                     "temperature": args.temperature, "seed": args.seed, "top_p": args.top_p, "top_k": args.top_k,
                     "stop": [], "where": "--prompt"}]  # fmt: skip
    try:
        engine = LLMEngine.from_model_dir(model, _engine_config(args))
    except (UnsupportedModel, DeltaError, FileNotFoundError, ValueError) as e:
        raise CliError(f"--model {model}: {e}") from None
    try:
        completions = engine.generate(_generate_batch(engine, requests))
    except (SamplingParamsError, DeltaError) as e:
        raise CliError(str(e)) from None
    for c in completions:
        if args.json:
            print(json.dumps({"text": c.text, "token_ids": c.token_ids}, ensure_ascii=False))
        else:
            print(c.text)
    return 0


def _generate_source(args: argparse.Namespace) -> tuple[str, str | None]:
    """The base directory and the adapter of `generate`: without --model the embedded demo, whose tenants'
    fine-tunes --tenant names."""
    model, adapter = args.model, args.adapter
    if model is not None:
        if args.tenant is not None:
            raise CliError("--tenant names a demo tenant: it works only without --model")
        return model, adapter
    from serving.demo import demo_dir, demo_tenants

    if args.tenant is not None:
        tenants = {t.name: t for t in demo_tenants()}
        if args.tenant not in tenants:
            raise CliError(f"--tenant {args.tenant}: not a demo tenant ({', '.join(tenants)})")
        if adapter is not None:
            raise CliError("give --tenant or --adapter, not both")
        adapter = str(tenants[args.tenant].adapter_path)
    return str(demo_dir() / "base"), adapter


def _generate_batch(engine, requests: list[dict[str, Any]]) -> list[tuple]:
    """(prompt, SamplingParams, delta) per request; each distinct adapter path is loaded once."""
    from registry.loading import load_delta
    from serving.engine.sampling_params import SamplingParams, SamplingParamsError

    deltas: dict[str, Any] = {}
    batch = []
    for req in requests:
        adapter = req["adapter"]
        if adapter is not None and adapter not in deltas:
            try:
                deltas[adapter] = load_delta(adapter, engine.spec, engine.config.max_lora_rank)
            except (DeltaError, FileNotFoundError) as e:
                raise CliError(f"{req['where']}: adapter {adapter}: {e}") from None
        try:
            params = SamplingParams(max_tokens=req["max_tokens"], temperature=req["temperature"], top_p=req["top_p"],
                                    top_k=req["top_k"], seed=req["seed"], stop=req["stop"])  # fmt: skip
        except (SamplingParamsError, TypeError) as e:
            raise CliError(f"{req['where']}: {e}") from None
        batch.append((req["prompt"], params, deltas.get(adapter) if adapter else None))
    return batch


def cmd_serve(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from registry.database import CatalogError
    from serving.server import run_server

    try:
        settings = ServerSettings(**given_flags(args, ServerSettings))  # flags over DELTASERVE_* variables over defaults
    except ValidationError as e:
        raise CliError(settings_error(e)) from None
    if settings.model is not None and not settings.model.is_dir():
        raise CliError(f"--model {settings.model}: not a directory")
    if settings.ray_address and not settings.replicas:
        raise CliError("--ray-address needs --replicas (the engine replicas to run on that cluster)")
    if settings.ingresses > 1 and not settings.replicas:
        raise CliError("--ingresses needs --replicas (the ingresses of a cluster)")
    if settings.ingresses > 1 and not (settings.catalog or "").startswith("postgresql"):
        # SQLite's locks hold only within one machine, and Ray may place ingresses on other nodes
        raise CliError("--ingresses above 1 needs --catalog postgresql://... (a catalog every ingress can reach)")
    try:
        if settings.replicas:
            from serving.cluster.launch import run_cluster

            return run_cluster(settings)
        return run_server(settings)
    except CatalogError as e:  # raised while opening, before anything is served
        raise CliError(str(e)) from None


def cmd_client(args: argparse.Namespace) -> int:
    import json as _json

    from serving.client import Client, ClientError, pull, push

    try:
        key = args.key or os.environ.get(args.key_env)
        if not key and args.command == "usage":  # the admin reads everyone's
            key = os.environ.get("DELTASERVE_ADMIN_KEY")
        client = Client(args.url, key, args.key_env)
        if args.command == "usage":
            query = {"granularity": args.by, "start": _unix_time(args.since, "--since"),
                     "end": _unix_time(args.until, "--until"), "model": args.model, "tenant": args.tenant}  # fmt: skip
            report = client.call("GET", "/v1/usage", params={k: v for k, v in query.items() if v is not None}).json()
            print(_json.dumps(report, indent=2) if args.json else usage_table(report))
            return 0
        if args.command == "tenants":
            if args.action == "create":
                out = client.call("POST", "/v1/tenants", json={"name": args.name}).json()
                print(f"tenant {out['name']} created; its API key (shown once): {out['api_key']}")
            elif args.action == "ls":
                for t in client.call("GET", "/v1/tenants").json()["data"]:
                    print(t["name"])
            else:
                client.call("DELETE", f"/v1/tenants/{args.name}")
            return 0
        if args.action == "push":
            fields, text = _recipe_of(args)
            print(_json.dumps(push(client, args.path, args.name, args.format, fields, text)))
        elif args.action == "recompress":
            fields, text = _recipe_of(args)
            body = {**fields, **({"calibration_text": text} if text is not None else {})}
            print(_json.dumps(client.call("POST", f"/v1/adapters/{args.name}/recompress", json=body).json()))
        elif args.action == "ls":
            print(adapter_table(client.call("GET", "/v1/adapters").json()["data"]))
        elif args.action == "show":
            adapter = client.call("GET", f"/v1/adapters/{args.name}").json()
            adapter["fidelity"] = fidelity_line(adapter.get("fidelity"))
            print("\n".join(f"{k + ':':12} {'-' if v is None else v}" for k, v in adapter.items()))
        elif args.action == "pull":
            for f in pull(client, args.name, args.out):
                print(f"{args.out / f['name']}  {f['size']} bytes  sha256 {f['sha256']}")
        else:
            client.call("DELETE", f"/v1/adapters/{args.name}")
        return 0
    except ClientError as e:
        raise CliError(str(e)) from None


def fidelity_line(f: dict[str, Any] | None) -> str | None:
    """`adapters show`: a fine-tune version's fidelity on its held-out calibration text, in one line."""
    if f is None:
        return None
    gain = "n/a (the fine-tune does not beat the base there)" if f["gain_kept"] is None else f"{f['gain_kept']:.1%}"
    return (f"gain kept {gain}, top-1 agreement {f['top1_agreement']:.1%} (ppl {f['perplexity']:.2f}; fine-tune "
            f"{f['finetune_perplexity']:.2f}, base {f['base_perplexity']:.2f}; {f['held_out_tokens']} held-out tokens; "
            f"{f['scale']} scales, {f['distill_steps']} distillation steps)")


def adapter_table(rows: list[dict[str, Any]]) -> str:
    """`adapters ls`: one line per adapter (a compression's progress in its status), a failed one's error under it."""
    lines = [f"{'NAME':24} {'FORMAT':9} {'VERSION':>7} {'STATUS':16} {'SIZE':>12}"]
    for r in rows:
        status = f"compressing {r['progress']:.0%}" if r["status"] == "compressing" else r["status"]
        lines.append(f"{r['name']:24} {r['format']:9} {r['version']:>7} {status:16} {r.get('size_bytes') or 0:>12}")
        if r["status"] == "failed" and r.get("error"):
            lines.append(f"  error: {r['error']}")
    return "\n".join(lines)


def _unix_time(text: str | None, flag: str) -> int | None:
    """--since/--until: unix seconds, or an ISO date or date-time (UTC unless it names its offset)."""
    import datetime as dt

    if text is None:
        return None
    if text.isdigit():
        return int(text)
    try:
        when = dt.datetime.fromisoformat(text)
    except ValueError:
        raise CliError(f"{flag} {text!r}: expected unix seconds or a date like 2026-12-01 or 2026-12-01T09:00") from None
    return int((when if when.tzinfo else when.replace(tzinfo=dt.timezone.utc)).timestamp())


def usage_table(report: dict[str, Any]) -> str:
    """`deltaserve usage`: one line per tenant, model and period, then the totals."""
    import datetime as dt

    fmt = "%Y-%m-%d" if report["granularity"] == "day" else "%Y-%m-%d %H:00"
    lines = [f"{'PERIOD (UTC)':17} {'TENANT':24} {'MODEL':24} {'REQUESTS':>9} {'PROMPT':>10} {'COMPLETION':>10} {'TOTAL':>10}"]
    for r in report["data"]:
        period = dt.datetime.fromtimestamp(r["period_start"], dt.timezone.utc).strftime(fmt)
        lines.append(f"{period:17} {r['tenant']:24} {r['model']:24} {r['requests']:>9} {r['prompt_tokens']:>10} "
                     f"{r['completion_tokens']:>10} {r['total_tokens']:>10}")  # fmt: skip
    t = report["total"]
    lines.append(f"{'total':67} {t['requests']:>9} {t['prompt_tokens']:>10} {t['completion_tokens']:>10} {t['total_tokens']:>10}")
    return "\n".join(lines)


def cmd_admin(args: argparse.Namespace) -> int:
    """`admin reset-key`: works on the registry folder itself (local access is the authority), never while a
    server has it open (servers read the key's hash when they start)."""
    from registry.catalog import Registry
    from registry.database import CatalogError

    if not args.registry.is_dir():
        raise CliError(f"--registry {args.registry}: not a directory")
    try:
        with Registry(args.registry, catalog=args.catalog, blob_store=args.blob_store) as registry:
            others = registry.other_processes()
            if others:
                running = ", ".join(f"pid {pid} on {host}" for host, pid in others)
                raise CliError(f"--registry {args.registry} is open by a running server ({running}); stop it first")
            key = registry.admin_key.reset()
    except CatalogError as e:
        raise CliError(str(e)) from None
    print(f"deltaserve: new admin key (shown once; the old one no longer works): {key}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.command == "generate":
            return cmd_generate(args)
        if args.command == "compress":
            return cmd_compress(args)
        if args.command == "eval":
            return cmd_eval(args)
        if args.command == "serve":
            return cmd_serve(args)
        if args.command in ("tenants", "adapters", "usage"):
            return cmd_client(args)
        if args.command == "admin":
            return cmd_admin(args)
    except CliError as e:
        print(f"deltaserve: error: {e}", file=sys.stderr)
        return 2
    parser.error(f"unknown command {args.command}")
    return 2


if __name__ == "__main__":
    sys.exit(main())
