"""The config: typed, self-documenting, and strict about mistakes."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import msgspec
import pytest
import yaml

from conftest import ROOT
from lls.config import (
    Config,
    ConfigError,
    ModelConfig,
    legacy_store_filename,
    load,
    parse,
    store_filename,
    store_filename_of,
)


def test_example_config_documents_every_key_with_its_default():
    example = yaml.safe_load((ROOT / "config.example.yaml").read_text())
    defaults = msgspec.to_builtins(Config())
    for section in ("gateway", "nats", "agent", "downloader", "placer"):
        assert set(example[section]) == set(defaults[section]), section
        for key, value in example[section].items():
            want = defaults[section][key]
            assert value == (list(want) if isinstance(want, tuple) else want), f"{section}.{key}"
    assert example["idle_timeout"] == defaults["idle_timeout"]
    model_keys = set().union(*(m.keys() for m in example["models"].values()))
    fields = {f.name for f in msgspec.structs.fields(ModelConfig)}
    assert fields == model_keys, f"undocumented model keys: {fields - model_keys}"


def test_shipped_configs_load():
    assert {"gemma3", "demo-tiny"} <= set(load(ROOT / "config.yaml").models)
    load(ROOT / "config.example.yaml")


@pytest.mark.parametrize(
    ("data", "names"),
    [
        ({"gatway": {}}, "gatway"),
        ({"gateway": {"prot": 1}}, "prot"),
        ({"gateway": {"port": 70000}}, "gateway.port"),
        ({"idle_timeout": "soon"}, "idle_timeout"),
        ({"agent": {"runtime": "podman"}}, "agent.runtime"),
        ({"agent": {"gpus": [{"name": "g", "memory_mib": -1}]}}, "agent.gpus[0].memory_mib"),
        ({"models": {"m": {"url": "ftp://x"}}}, "models.m.url"),
        ({"models": {"m": {"url": "file:///x", "ctx": 5}}}, "models.m"),
        ({"models": {"m": {"url": "file:///x", "sha256": "abc"}}}, "models.m.sha256"),
        ({"models": {"m": {}}}, "url"),
        ({"models": {"bad name!": {"url": "file:///x"}}}, "models.bad name!"),
    ],
)
def test_bad_config_is_rejected_naming_the_key(data, names):
    with pytest.raises(ConfigError) as e:
        parse(data)
    assert names in str(e.value)


def test_relative_file_urls_resolve_against_the_config_folder(tmp_path: Path):
    (tmp_path / "c.yaml").write_text("models:\n  m:\n    url: file://models/m.gguf\n")
    assert load(tmp_path / "c.yaml").models["m"].url == f"file://{tmp_path}/models/m.gguf"


def test_store_filename_follows_the_models_source():
    url, digest = "https://h/q4.gguf", "AB" * 32
    name = store_filename("m", url, digest)
    assert re.fullmatch(r"m-[0-9a-f]{8}\.gguf", name)
    assert store_filename("m", url, digest) == name  # stable: every service names it alike
    assert store_filename("m", url, digest.lower()) == name  # a checksum's case is no change
    assert store_filename("m", url) == store_filename("m", url, None)
    others = {
        store_filename("m", "https://h/q8.gguf", digest),  # another url
        store_filename("m", url, "cd" * 32),  # another checksum
        store_filename("m", url),  # none
        store_filename("n", url, digest),  # another model
    }
    assert name not in others and len(others) == 4
    assert store_filename_of("m", ModelConfig(url=url, sha256=digest)) == name

    # a split GGUF keeps its suffix at the end: llama-server finds parts 2..N from it
    split = store_filename("m", "hf://o/r/big-00001-of-00003.gguf")
    assert re.fullmatch(r"m-[0-9a-f]{8}-00001-of-00003\.gguf", split)
    # one plain name, whatever the model is called
    odd = store_filename("org/../x y:latest", url)
    assert "/" not in odd and " " not in odd and ":" not in odd
    assert odd.startswith("org_.._x_y_latest-") and legacy_store_filename("a/b") == "a_b.gguf"


def test_service_start_up_stops_on_bad_config_naming_the_key(tmp_path: Path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("gateway:\n  port: 5000\n  bogus: 1\n")
    for argv in (
        ["-m", "lls.run", "--config", str(bad)],
        ["-m", "services.placer", "--config", str(bad), "--nats", "nats://x:1"],
    ):
        r = subprocess.run(
            [sys.executable, *argv], cwd=ROOT, capture_output=True, text=True, timeout=30
        )
        assert r.returncode != 0
        assert "bogus" in r.stderr and "gateway" in r.stderr
