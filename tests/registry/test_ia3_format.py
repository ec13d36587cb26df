"""registry.ia3_format: PEFT (IA)^3 directories, checked against the base and loaded as Ia3Delta; and what the
rest of the registry does with them (the loader's dispatch, upload formats, blobs, the catalog)."""

from __future__ import annotations

import json
import shutil
import sqlite3
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from registry.blob_store import content_sha256
from registry.catalog import Registry
from registry.checkpoint import Checkpoint
from registry.deltas import Ia3Delta
from registry.errors import AdapterMismatch, PickleRefused
from registry.fingerprint import base_spec
from registry.ia3_format import load_ia3_dir
from registry.loading import load_delta
from registry.peft_dir import CONFIG_FILE, WEIGHTS_FILE
from tests.helpers import make_ia3, make_lora, make_model_dir
from tests.registry.assets import add_files, lora_files
from tests.registry.legacy import assert_current, make_pre_alembic

K0 = "model.layers.0.self_attn.k_proj"
D1 = "model.layers.1.mlp.down_proj"


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("ia3")
    base = make_model_dir(root / "base")
    ia3, merged = make_ia3(base, root / "ia3", seed=1)
    lora, _ = make_lora(base, root / "lora", r=2, seed=1)
    return base_spec(Checkpoint(base)), ia3, merged, lora


def edited(src: Path, dst: Path, config: dict | None = None, tensors: dict | None = None) -> Path:
    """A copy of adapter directory src with config options and tensors replaced (None value: removed)."""
    shutil.copytree(src, dst)
    if config:
        cfg = json.loads((dst / CONFIG_FILE).read_text())
        cfg.update(config)
        (dst / CONFIG_FILE).write_text(json.dumps(cfg))
    if tensors:
        weights = load_file(dst / WEIGHTS_FILE)
        for k, v in tensors.items():
            if v is None:
                weights.pop(k)
            else:
                weights[k] = v
        save_file(weights, dst / WEIGHTS_FILE)
    return dst


def test_a_peft_directory_loads_with_its_vectors_roles_and_identity(world) -> None:
    spec, ia3, merged, _ = world
    delta = load_ia3_dir(ia3, spec)
    assert isinstance(delta, Ia3Delta) and delta.kind == "ia3"
    assert sorted(delta.vectors) == sorted(f"model.layers.{i}.{m}" for i in (0, 1)
                                           for m in ("self_attn.k_proj", "self_attn.v_proj", "mlp.down_proj"))
    assert delta.feedforward == {"model.layers.0.mlp.down_proj", D1}
    assert delta.vectors[K0].shape == (32,) and delta.vectors[D1].shape == (96,)
    assert delta.sha256 == content_sha256("ia3", ia3)
    # The vectors are PEFT's merge: W' = W * l (rows for keys/values, columns for the feedforward down_proj).
    base = load_file(spec_model_file(ia3))
    state = merged.state_dict()
    torch.testing.assert_close(state[K0 + ".weight"], base[K0 + ".weight"] * delta.vectors[K0][:, None])
    torch.testing.assert_close(state[D1 + ".weight"], base[D1 + ".weight"] * delta.vectors[D1][None, :])
    again = load_delta(ia3, spec)  # the loader picks the family by peft_type
    assert isinstance(again, Ia3Delta) and again.sha256 == delta.sha256


def spec_model_file(ia3: Path) -> Path:
    return ia3.parent / "base" / "model.safetensors"


@pytest.mark.parametrize(
    "config,param",
    [
        ({"peft_type": "LORA"}, "peft_type"),
        ({"fan_in_fan_out": True}, "fan_in_fan_out"),
        ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
        ({"some_new_option": 3}, "some_new_option"),
        ({"feedforward_modules": 7}, "feedforward_modules"),
    ],
)
def test_options_that_change_the_computation_are_refused_by_name(world, tmp_path, config, param) -> None:
    spec, ia3, _, _ = world
    with pytest.raises(AdapterMismatch) as e:
        load_ia3_dir(edited(ia3, tmp_path / "a", config=config), spec)
    assert e.value.param == param


def test_a_vector_whose_shape_is_not_its_role_is_refused_naming_it(world, tmp_path) -> None:
    spec, ia3, _, _ = world
    key = f"base_model.model.{D1}.ia3_l"
    # down_proj is feedforward (its input scaled: [1, 96]); saved as an output scaling [64, 1] it is refused.
    with pytest.raises(AdapterMismatch, match=r"expected \[1, 96\]") as e:
        load_ia3_dir(edited(ia3, tmp_path / "a", tensors={key: torch.ones(64, 1)}), spec)
    assert e.value.param == key
    # Not feedforward any more: the [1, 96] vector is now the wrong shape.
    with pytest.raises(AdapterMismatch, match=r"expected \[64, 1\]"):
        load_ia3_dir(edited(ia3, tmp_path / "b", config={"feedforward_modules": []}), spec)


@pytest.mark.parametrize(
    "key,value,match",
    [
        (f"base_model.model.{K0}.ia3_l", torch.full((32, 1), float("nan")), "NaN|finite"),
        (f"base_model.model.{K0}.ia3_l", torch.full((32, 1), 1e6), "above the limit"),
        (f"base_model.model.{K0}.ia3_l", torch.ones(32, 1, dtype=torch.int32), "floating point"),
        ("base_model.model.model.embed_tokens.ia3_l", torch.ones(1, 64), "not an attention/MLP projection"),
        (f"base_model.model.{K0}.lora_A.weight", torch.ones(2, 64), "ia3_l"),
        (f"{K0}.ia3_l", torch.ones(32, 1), "does not start with"),
    ],
)
def test_bad_tensors_are_refused_naming_the_key(world, tmp_path, key, value, match) -> None:
    spec, ia3, _, _ = world
    with pytest.raises(AdapterMismatch, match=match) as e:
        load_ia3_dir(edited(ia3, tmp_path / "a", tensors={key: value}), spec)
    assert e.value.param == key


def test_a_pattern_of_feedforward_modules_is_not_evaluated_the_shape_decides(world, tmp_path) -> None:
    spec, ia3, _, _ = world
    # Non-square modules: the shapes say which vectors scale inputs, the same delta as with the list.
    same = load_ia3_dir(edited(ia3, tmp_path / "a", config={"feedforward_modules": ".*down_proj"}), spec)
    assert same.feedforward == load_ia3_dir(ia3, spec).feedforward
    # A square projection (q_proj: 64 x 64) cannot be told apart: refused, asking for the list.
    square = edited(ia3, tmp_path / "b", config={"feedforward_modules": ".*down_proj"},
                    tensors={"base_model.model.model.layers.0.self_attn.q_proj.ia3_l": torch.ones(64, 1)})
    with pytest.raises(AdapterMismatch, match="list of module names") as e:
        load_ia3_dir(square, spec)
    assert e.value.param == "feedforward_modules"


def test_pickle_weights_are_refused_and_never_read(world, tmp_path) -> None:
    spec, ia3, _, _ = world
    d = edited(ia3, tmp_path / "a")
    (d / WEIGHTS_FILE).unlink()
    (d / "adapter_model.bin").write_bytes(b"\x80\x04not really")
    with pytest.raises(PickleRefused):
        load_ia3_dir(d, spec)


def test_an_unknown_peft_type_is_refused_by_the_loader(world, tmp_path) -> None:
    spec, ia3, _, _ = world
    with pytest.raises(AdapterMismatch, match="LORA or IA3") as e:
        load_delta(edited(ia3, tmp_path / "a", config={"peft_type": "PREFIX_TUNING"}), spec)
    assert e.value.param == "peft_type"


@pytest.mark.parametrize("fmt,which", [("ia3", "lora"), ("lora", "ia3")])
def test_an_upload_whose_peft_type_is_not_its_format_is_refused(world, tmp_path, fmt, which) -> None:
    spec, ia3, _, lora = world
    with Registry(tmp_path / "reg") as reg:
        st = add_files(reg.stage(format=fmt), lora_files(ia3 if which == "ia3" else lora))
        with pytest.raises(AdapterMismatch, match=f"upload it with format {which}") as e:
            st.validate(fmt, spec)
        assert e.value.param == "format"
        st.discard()


def test_an_ia3_upload_is_stored_as_an_ia3_blob_and_loads_back(world, tmp_path) -> None:
    spec, ia3, _, _ = world
    with Registry(tmp_path / "reg") as reg:
        reg.create_tenant("acme")
        st = add_files(reg.stage(format="ia3"), lora_files(ia3))
        delta = st.validate("ia3", spec)
        record = reg.commit_adapter("acme", "kv", "ia3", st, delta)
        assert (record.format, record.kind, record.rank) == ("ia3", "ia3", None)
        assert record.blob.startswith("ia3/")
        again = load_delta(reg.blob_path(record), spec)
        assert again.kind == "ia3" and again.sha256 == record.sha256 == delta.sha256


V3_FORMAT_CHECK = "CHECK (format IN ('lora', 'bitdelta', 'finetune'))"


def test_a_version_3_catalog_is_rebuilt_to_accept_ia3_keeping_every_row(world, tmp_path) -> None:
    spec, ia3, _, lora = world
    root = tmp_path / "reg"
    with Registry(root) as reg:
        reg.create_tenant("acme")
        st = add_files(reg.stage(format="lora"), lora_files(lora))
        kept = reg.commit_adapter("acme", "x", "lora", st, st.validate("lora", spec))
        pending = reg.create_pending("acme", "ft", "finetune")
    # Make it the catalog a schema-3 deltaserve wrote: the adapters table with the old format CHECK.
    db = make_pre_alembic(root / "catalog.sqlite3")
    (sql,) = db.execute("SELECT sql FROM sqlite_master WHERE name='adapters'").fetchone()
    db.executescript(
        "PRAGMA foreign_keys=OFF; BEGIN;"
        + sql.replace("CREATE TABLE adapters", "CREATE TABLE old").replace(
            "CHECK (format IN ('lora', 'ia3', 'bitdelta', 'finetune'))", V3_FORMAT_CHECK)
        + "; INSERT INTO old SELECT * FROM adapters; DROP TABLE adapters; ALTER TABLE old RENAME TO adapters;"
        "PRAGMA user_version=3; COMMIT;"
    )
    assert V3_FORMAT_CHECK in db.execute("SELECT sql FROM sqlite_master WHERE name='adapters'").fetchone()[0]
    db.close()
    with Registry(root) as reg:
        assert reg.get_adapter("acme", "x") == kept
        assert reg.get_adapter("acme", "ft").id == pending.id  # failed by the restart, but there
        st = add_files(reg.stage(format="ia3"), lora_files(ia3))
        assert reg.commit_adapter("acme", "kv", "ia3", st, st.validate("ia3", spec)).format == "ia3"
        assert reg.create_tenant("other")  # the tenants table and its foreign key still work
        reg.delete_tenant("acme")
    assert_current(root / "catalog.sqlite3")
    db = sqlite3.connect(root / "catalog.sqlite3")
    assert db.execute("SELECT COUNT(*) FROM adapters").fetchone()[0] == 0  # the tenant's rows went with it
    db.close()
