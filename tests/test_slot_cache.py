"""Warm swaps without I/O around them: slot file naming and keying, the eviction policy
(oldest out past the limit), and the folder operations on a real temporary folder."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from services.agent import slot_cache
from services.agent.runtime import build_argv
from services.agent.slot_cache import CachedFile, cache_key, evictions, parse, restorable

MODEL = "tiny-1a2b3c4d.gguf"
BIN = "/cache/llama-server-11434.0.0/bin/llama-server"


def key(fp: str = "fp1", program: str = BIN, ngl: int = 0, model: str = MODEL) -> str:
    return cache_key(model, fp, program, ngl)


def test_key_names_the_model_file_and_changes_with_anything_that_shapes_the_kv_cache() -> None:
    k = key()
    assert k.startswith("tiny-1a2b3c4d.") and k == key()  # stable: the next start finds it
    others = {key(fp="fp2"), key(program="ghcr.io/ggml-org/llama.cpp:server"), key(ngl=99)}
    others.add(key(model="other-00000000.gguf"))
    assert k not in others and len(others) == 4


def test_a_model_file_name_never_makes_a_path_or_a_hidden_file() -> None:
    k = cache_key("../../etc/passwd", "fp", BIN, 0)
    assert "/" not in k and not k.startswith(".") and slot_cache.is_key(k)
    long = cache_key("m" * 300 + ".gguf", "fp", BIN, 0)
    assert slot_cache.is_key(long) and len(slot_cache.slot_file(long, 9999)) < 255
    # a key read back from a state file or a container label names files: checked first
    assert not any(map(slot_cache.is_key, ["", "../x.0123456789abcdef", "x/y.0123456789abcdef"]))
    assert parse(slot_cache.slot_file(k, 0)) == (k, 0)


def test_slot_files_parse_back_to_their_key_and_slot_and_nothing_else_does() -> None:
    k = key()
    assert parse(slot_cache.slot_file(k, 3)) == (k, 3)
    assert parse("notes.txt") is None and parse(f"{k}.slot3.bin.part") is None
    temp = slot_cache.temp_file("tiny-0123abcd", 1)
    assert parse(temp) is None and slot_cache.is_temp(temp) and slot_cache.is_ours(temp)
    assert temp != slot_cache.temp_file("tiny-0123abce", 1)
    names = [temp, slot_cache.temp_file("tiny-0123abcd", 12), slot_cache.temp_file("x-0123abce", 1)]
    assert slot_cache.temps_of("tiny-0123abcd", names + [k]) == names[:2]
    with pytest.raises(ValueError):
        slot_cache.slot_file(k, -1)


def test_restore_takes_only_files_of_the_same_launch_and_only_slots_the_instance_has() -> None:
    k, other = key(), key(fp="ctx-2048")
    names = [slot_cache.slot_file(k, i) for i in range(3)]
    names += [slot_cache.slot_file(other, 0), "junk.bin", slot_cache.temp_file("x-0123abcd", 0)]
    assert restorable(k, names, 2) == {0: names[0], 1: names[1]}
    assert restorable(k, names, 8) == {0: names[0], 1: names[1], 2: names[2]}
    assert restorable(key(fp="never-saved"), names, 4) == {}


def test_eviction_deletes_oldest_first_until_the_rest_fit() -> None:
    files = [CachedFile("new", 400, 30.0), CachedFile("old", 400, 10.0), CachedFile("mid", 400, 20)]
    assert evictions(files, 1200) == []  # exactly at the limit: nothing goes
    gone = evictions(files, 1000)
    assert [n for n, _ in gone] == ["old"] and "oldest out" in gone[0][1]
    assert [n for n, _ in evictions(files, 500)] == ["old", "mid"]
    assert [n for n, _ in evictions(files, 0)] == ["old", "mid", "new"]  # 0 = keep nothing


def test_a_file_larger_than_the_whole_limit_goes_too() -> None:
    files = [CachedFile("huge", 5000, 50.0), CachedFile("small", 10, 1.0)]
    assert [n for n, _ in evictions(files, 1000)] == ["small", "huge"]


def test_equal_times_evict_in_name_order() -> None:
    files = [CachedFile("b", 10, 5.0), CachedFile("a", 10, 5.0)]
    assert [n for n, _ in evictions(files, 10)] == ["a"]


def test_cache_dir_is_per_host_under_the_store_or_the_configured_folder(tmp_path: Path) -> None:
    assert slot_cache.cache_dir("", tmp_path / "store", "h1") == tmp_path / "store/slot-cache/h1"
    assert slot_cache.cache_dir(str(tmp_path / "c"), tmp_path, "h2") == tmp_path / "c" / "h2"


def test_prune_and_prepare_touch_only_this_caches_files(tmp_path: Path) -> None:
    k = key()
    mib = 1024 * 1024
    for i, age in enumerate((300, 200, 100)):  # slot 0 oldest
        f = tmp_path / slot_cache.slot_file(k, i)
        f.write_bytes(b"\0" * (mib // 2))
        os.utime(f, (1e9 - age, 1e9 - age))
    (tmp_path / "README").write_bytes(b"\0" * (2 * mib))  # not ours: never counted or deleted
    temp = tmp_path / slot_cache.temp_file("tiny-0123abcd", 0)
    temp.write_bytes(b"x")
    os.utime(temp, (0, 0))
    slot_cache.prepare(tmp_path, 1)  # 1 MiB: the temp goes, then the oldest slot file
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == sorted(["README", slot_cache.slot_file(k, 1), slot_cache.slot_file(k, 2)])
    slot_cache.touch(tmp_path, slot_cache.slot_file(k, 1))  # restored: now the newest
    (tmp_path / slot_cache.slot_file(k, 3)).write_bytes(b"x")  # a new save: over the limit
    assert slot_cache.prune(tmp_path, 1) == [slot_cache.slot_file(k, 2)]  # least used out
    slot_cache.prepare(tmp_path, 0)  # warm swaps off: the folder keeps nothing of ours
    assert [p.name for p in tmp_path.iterdir()] == ["README"]
    slot_cache.prepare(tmp_path / "absent", 10)  # no folder yet: nothing to do


def test_commit_replaces_an_older_save_of_the_same_slot(tmp_path: Path) -> None:
    final = slot_cache.slot_file(key(), 0)
    (tmp_path / final).write_bytes(b"old")
    temp = slot_cache.temp_file("tiny-0123abcd", 0)
    (tmp_path / temp).write_bytes(b"new")
    slot_cache.commit(tmp_path, temp, final)
    assert (tmp_path / final).read_bytes() == b"new" and not (tmp_path / temp).exists()


def test_argv_enables_slot_saves_only_with_a_folder_and_leaves_a_models_own_path() -> None:
    base: dict = dict(alias="m", host="h", port=1, ctx_size=8, n_gpu_layers=0)
    assert "--slot-save-path" not in build_argv("/m.gguf", **base)
    a = build_argv("/m.gguf", slot_save_path="/lls-slots", **base)
    assert a[a.index("--slot-save-path") + 1] == "/lls-slots"
    own = build_argv("/m.gguf", slot_save_path="/x", args=["--slot-save-path", "/y"], **base)
    assert own.count("--slot-save-path") == 1 and own[-1] == "/y"


def test_docker_mounts_the_slot_folder_read_write_and_runs_as_the_agents_user(
    tmp_path: Path,
) -> None:
    from types import SimpleNamespace

    from test_agent_units import FakeContainers

    from services.agent.runtime import LaunchSpec
    from services.agent.runtime_docker import SLOTS_DIR, DockerRuntime

    client = SimpleNamespace(containers=FakeContainers())
    rt = DockerRuntime(client, "h1", tmp_path, "ghcr.io/ggml-org/llama.cpp:server", "cl1")
    spec = dict(
        instance_id="m-0123abcd",
        model="m",
        filename="m.gguf",
        port=1,
        bind_host="127.0.0.1",
        ctx_size=8,
        n_gpu_layers=0,
    )
    rt.launch(LaunchSpec(**spec, slot_dir=str(tmp_path / "slots")))  # type: ignore[arg-type]
    [run] = client.containers.runs
    assert run["volumes"][str(tmp_path / "slots")] == {"bind": SLOTS_DIR, "mode": "rw"}
    assert run["command"][run["command"].index("--slot-save-path") + 1] == SLOTS_DIR
    assert run["user"] == f"{os.getuid()}:{os.getgid()}"
    rt.launch(LaunchSpec(**spec))  # type: ignore[arg-type]
    assert "user" not in client.containers.runs[-1]
    assert "--slot-save-path" not in client.containers.runs[-1]["command"]


def test_only_slots_with_a_prompt_worth_a_file_are_saved() -> None:
    from services.agent.slot_cache import MIN_TOKENS, worth_saving

    slots = [
        {"id": 0, "n_ctx": 512, "is_processing": False},  # never used
        {"id": 1, "n_prompt_tokens": MIN_TOKENS - 1},  # a short prompt: cheaper to recompute
        {"id": 2, "n_prompt_tokens": MIN_TOKENS},
        {"id": 3, "n_prompt_tokens": 5000},
    ]
    assert worth_saving(slots) == [2, 3]
    assert worth_saving({"error": "no"}) is None  # not understood: every slot is tried
    assert worth_saving([{"n_prompt_tokens": 900}]) is None


def test_a_server_is_idle_only_when_it_says_no_slot_is_processing() -> None:
    from services.agent.slot_cache import all_idle

    assert all_idle([{"id": 0, "is_processing": False}, {"id": 1, "is_processing": False}])
    assert not all_idle([{"id": 0, "is_processing": False}, {"id": 1, "is_processing": True}])
    assert not all_idle([{"id": 0}])  # not said: not idle
    assert not all_idle([]) and not all_idle({"error": "x"})
