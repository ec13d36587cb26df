"""`deltaserve generate` as the contract states it: single prompt, adapters, JSONL mixed batches, errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from serving.cli import main
from tests.helpers import greedy_tokens, hf_model, make_bitdelta, make_lora, make_model_dir, make_tokenizer

ENGINE_FLAGS = ["--device", "cpu", "--dtype", "float32", "--max-model-len", "64", "--max-lora-rank", "8"]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    base = make_model_dir(root / "base", arch="mistral")
    lora, lora_merged = make_lora(base, root / "lora", r=4, seed=1)
    bd, bd_merged = make_bitdelta(base, root / "bd.safetensors", seed=2, per_row=True, replace=True)
    return root, base, {None: hf_model(base), str(lora): lora_merged, str(bd): bd_merged}


def run_cli(capsys, *args) -> tuple[int, list[str], str]:
    code = main(list(args))
    out = capsys.readouterr()
    return code, out.out.splitlines(), out.err


def test_generate_prompt_json(world, capsys):
    _, base, merged = world
    for adapter, model in merged.items():
        extra = ["--adapter", adapter] if adapter else []
        code, lines, _ = run_cli(capsys, "generate", "--model", str(base), *extra, "--prompt", "To be or not",
                                 "--max-tokens", "10", "--temperature", "0", "--json", *ENGINE_FLAGS)
        assert code == 0 and len(lines) == 1
        result = json.loads(lines[0])
        assert set(result) == {"text", "token_ids"}
        assert result["token_ids"] == greedy_tokens(model, make_tokenizer(), "To be or not", 10), adapter
        assert result["text"] == make_tokenizer().decode(result["token_ids"], skip_special_tokens=True)


def test_generate_requests_file_runs_mixed_batches(world, capsys, tmp_path):
    _, base, merged = world
    adapters = list(merged)
    lines = []
    prompts = ["The quick brown fox", "All that glitters", "def main():", "To be", "A journey of"]
    for i, prompt in enumerate(prompts * 2):
        req = {"prompt": prompt, "adapter": adapters[i % 3], "max_tokens": 4 + i % 5, "temperature": 0}
        lines.append(json.dumps(req))
    lines.append(json.dumps({"prompt": "Caf\u00e9", "temperature": 0.9, "seed": 5, "max_tokens": 6}))
    reqs = tmp_path / "reqs.jsonl"
    reqs.write_text("\n".join(lines) + "\n")
    code, out, _ = run_cli(capsys, "generate", "--model", str(base), "--requests", str(reqs), "--json", *ENGINE_FLAGS)
    assert code == 0 and len(out) == len(lines)
    for line, result in zip(lines[:-1], out[:-1]):
        req = json.loads(line)
        assert json.loads(result)["token_ids"] == greedy_tokens(merged[req["adapter"]], make_tokenizer(), req["prompt"], req["max_tokens"])
    # the seeded sampled request gives the same tokens alone
    code, alone, _ = run_cli(capsys, "generate", "--model", str(base), "--prompt", "Caf\u00e9", "--temperature", "0.9",
                             "--seed", "5", "--max-tokens", "6", "--json", *ENGINE_FLAGS)
    assert json.loads(alone[0])["token_ids"] == json.loads(out[-1])["token_ids"]


@pytest.mark.parametrize(
    "args,needle",
    [
        (["--model", "/nonexistent/model"], "/nonexistent/model"),
        (["--adapter", "/nonexistent/adapter"], "no such adapter"),
        (["--max-tokens", "0"], "max_tokens"),
        (["--temperature", "-1"], "temperature"),
    ],
)
def test_generate_errors(world, capsys, args, needle):
    _, base, _ = world
    argv = ["generate", "--model", str(base), "--prompt", "hi", *ENGINE_FLAGS]
    for i in range(0, len(args), 2):
        if args[i] in argv:
            argv[argv.index(args[i]) + 1] = args[i + 1]
        else:
            argv += args[i : i + 2]
    code, _, err = run_cli(capsys, *argv)
    assert code == 2 and err.startswith("deltaserve: error:") and needle in err


def test_generate_refuses_a_pickle_adapter_and_bad_jsonl(world, capsys, tmp_path):
    _, base, _ = world
    evil = tmp_path / "evil.safetensors"
    evil.write_bytes(b"\x80\x04\x95" + b"\x00" * 64)  # a pickle stream, whatever its name says
    code, _, err = run_cli(capsys, "generate", "--model", str(base), "--adapter", str(evil), "--prompt", "hi", *ENGINE_FLAGS)
    assert code == 2 and "pickle" in err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "ok"}\n{"prompt": 3}\n')
    code, _, err = run_cli(capsys, "generate", "--model", str(base), "--requests", str(bad), *ENGINE_FLAGS)
    assert code == 2 and "bad.jsonl:2" in err


def test_installed_command_runs(world):
    """The `deltaserve` entry point (as installed by the README's setup) works end to end."""
    _, base, _ = world
    exe = os.path.join(os.path.dirname(sys.executable), "deltaserve")
    cmd = [exe] if os.path.exists(exe) else [sys.executable, "-m", "serving.cli"]
    proc = subprocess.run([*cmd, "generate", "--model", str(base), "--prompt", "hi", "--max-tokens", "3", "--json",
                           *ENGINE_FLAGS], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert len(json.loads(proc.stdout)["token_ids"]) <= 3
