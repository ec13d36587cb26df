"""What the CLI and start-up say: `adapters ls` with progress and errors, `adapters show`, `admin reset-key`,
and the start-up line naming what is served."""

from __future__ import annotations

import pytest

from registry.catalog import Registry
from serving.cli import adapter_table
from serving.cli import main as cli_main
from tests.api.conftest import ADMIN_KEY


def test_adapters_ls_shows_progress_and_a_failed_compressions_error():
    rows = [
        {"name": "a", "format": "lora", "version": 1, "status": "ready", "progress": 1.0, "error": None, "size_bytes": 10},
        {"name": "b", "format": "finetune", "version": 2, "status": "compressing", "progress": 0.42, "error": None},
        {"name": "c", "format": "finetune", "version": 1, "status": "failed", "progress": 0.3,
         "error": "tensor x has shape [2], the base has [3]"},
    ]  # fmt: skip
    lines = adapter_table(rows).splitlines()
    assert lines[0].split() == ["NAME", "FORMAT", "VERSION", "STATUS", "SIZE"]
    assert lines[1].split() == ["a", "lora", "1", "ready", "10"]
    assert lines[2].split()[:5] == ["b", "finetune", "2", "compressing", "42%"]
    assert lines[3].split()[:4] == ["c", "finetune", "1", "failed"]
    assert lines[4] == "  error: tensor x has shape [2], the base has [3]"
    assert len(lines) == 5


def test_adapters_ls_through_a_server_shows_progress_and_the_error(live, capsys, monkeypatch):
    # What the catalog holds for a compression under way and a failed one, as `adapters ls` prints it from the API.
    key = live.new_tenant("lister")
    registry = live.backend.registry
    running = registry.create_pending("lister", "busy", "finetune")
    registry.set_progress(running.id, 0.42)
    failed = registry.create_pending("lister", "broken", "finetune")
    registry.fail_pending(failed.id, "tensor x has shape [2], the base has [3]")
    monkeypatch.setenv("DELTASERVE_URL", live.url)
    monkeypatch.setenv("DELTASERVE_API_KEY", key)
    assert cli_main(["adapters", "push", str(live.files["lora"]), "--name", "fine", "--format", "lora"]) == 0
    capsys.readouterr()
    assert cli_main(["adapters", "ls"]) == 0
    lines = capsys.readouterr().out.splitlines()
    rows = {line.split()[0]: line.split() for line in lines[1:] if not line.startswith(" ")}
    assert rows["busy"][1:5] == ["finetune", "1", "compressing", "42%"]
    assert rows["broken"][1:4] == ["finetune", "1", "failed"]
    assert lines[lines.index(next(x for x in lines if x.startswith("broken"))) + 1] == (
        "  error: tensor x has shape [2], the base has [3]")  # fmt: skip
    assert rows["fine"][1:4] == ["lora", "1", "ready"]


def test_adapters_show(live, capsys, monkeypatch):
    key = live.new_tenant("shower")
    monkeypatch.setenv("DELTASERVE_URL", live.url)
    monkeypatch.setenv("DELTASERVE_API_KEY", key)
    assert cli_main(["adapters", "push", str(live.files["lora"]), "--name", "shown", "--format", "lora"]) == 0
    capsys.readouterr()
    assert cli_main(["adapters", "show", "shown"]) == 0
    fields = dict(line.split(":", 1) for line in capsys.readouterr().out.splitlines())
    record = live.backend.registry.resolve("shower", "shown")
    assert fields["name"].strip() == "shown" and fields["status"].strip() == "ready"
    assert fields["version"].strip() == "1" and fields["sha256"].strip() == record.sha256
    assert fields["error"].strip() == "-"
    assert cli_main(["adapters", "show", "missing"]) == 2
    assert "404" in capsys.readouterr().err


def test_admin_reset_key_replaces_a_lost_key(tmp_path, capsys):
    root = tmp_path / "reg"
    with Registry(root) as reg:
        reg.ensure_admin_key(ADMIN_KEY)
    assert cli_main(["admin", "reset-key", "--registry", str(root)]) == 0
    new_key = capsys.readouterr().out.strip().split()[-1]
    with Registry(root) as reg:
        reg.ensure_admin_key(None)  # what a server started without --admin-key does
        assert reg.is_admin(new_key) and not reg.is_admin(ADMIN_KEY)
    assert oct((root / "admin_key.sha256").stat().st_mode & 0o777) == "0o600"


def test_admin_reset_key_refuses_while_a_server_holds_the_registry(tmp_path, capsys):
    root = tmp_path / "reg"
    with Registry(root) as reg:
        reg.ensure_admin_key(ADMIN_KEY)
        assert cli_main(["admin", "reset-key", "--registry", str(root)]) == 2
        assert "stop it first" in capsys.readouterr().err
        assert reg.is_admin(ADMIN_KEY)
    assert cli_main(["admin", "reset-key", "--registry", str(tmp_path / "nowhere")]) == 2


def test_the_start_up_line_names_what_is_served(live):
    line = live.backend.describe()
    for part in (f"serving {live.backend.model_id} from {live.base_dir}", "on cpu in float32", "delta kernels: torch",
                 "GPU slots: 8 LoRA (rank <= 8), 4 1-bit", "host tier 4096 MB", "KV cache 64 blocks of 16 tokens",
                 "max_model_len 128"):  # fmt: skip
        assert part in line, (part, line)


@pytest.mark.parametrize("argv", [["admin"], ["admin", "bogus"]])
def test_admin_needs_an_action(argv):
    with pytest.raises(SystemExit):
        cli_main(argv)
