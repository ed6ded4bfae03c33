"""Per-model chat templates (`models.<name>.chat_template`): the config's three forms and
their errors, the built-in list against the pinned llama-server, the agent's argv and
template file, the GGUF header's flag and the warning it raises, and a real stack whose
llama-servers apply the configured templates and report them in /api/show."""

from __future__ import annotations

import asyncio
import hashlib
import re
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import msgspec
import pytest
import yaml
from test_agent import (
    MODELS,
    Agents,
    agent_config,
    agents,  # noqa: F401 - fixture
    key_for,
    new_iid,
    place,
    put_model,
    start_cmd,
    wait_state,
)
from test_agent_docker import docker_host, our_containers  # noqa: F401 - fixture
from test_cli import lls as run_lls
from test_dashboard import CHROMIUM, CHROMIUM_ARGS, GATEWAY, HAVE_CHROMIUM, host, start_ui  # noqa: F401

import proto
from conftest import require
from lls import chat_templates, instance_key
from lls.bus import connect, kv_snapshot
from lls.config import ConfigError, launch_fingerprint, load, parse, store_filename_of
from lls.gguf_header import read_summary
from make_tiny_gguf import write as write_gguf
from services.agent.commands import refusal
from services.agent.runtime import build_argv
from services.agent.store import Store
from services.ui.view import View
from stack import Stack

JINJA = (
    "{% for m in messages %}[{{ m['role'] }}]{{ m['content'] }}{% endfor %}"
    "{% if add_generation_prompt %}[assistant]{% endif %}"
)
HI = [{"role": "user", "content": "hi"}]
GEMMA_HI = "<start_of_turn>user\nhi<end_of_turn>\n<start_of_turn>model\n"


def load_models(tmp_path: Path, models: dict) -> dict:
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump({"models": models}))
    return load(path).models


def model(**kw: object) -> dict:
    return {"url": "file:///models/x.gguf", **kw}


# ------------------------------------------------------------------ config


def test_builtin_names_are_the_pinned_llama_servers(llama_server_bin):
    out = subprocess.run(
        [str(llama_server_bin), "--help"], capture_output=True, text=True, timeout=60
    )
    found = re.search(
        r"list of built-in templates:\s*(.*?)\(env: LLAMA_ARG_CHAT_TEMPLATE\)",
        out.stdout + out.stderr,
        re.S,
    )
    assert found, "llama-server --help no longer lists its built-in templates"
    names = {n.strip() for n in found.group(1).split(",")}
    assert names == set(chat_templates.BUILTIN)


def test_each_form_loads_as_a_name_or_jinja_text(tmp_path, monkeypatch):
    (tmp_path / "tmpl").mkdir()
    (tmp_path / "tmpl" / "chat.jinja").write_text(JINJA)
    (tmp_path / "gemma").write_text(JINJA)  # a file named like a built-in: ./gemma
    monkeypatch.chdir("/")  # relative paths are the config file's folder's, not the cwd's
    models = load_models(
        tmp_path,
        {
            "own": model(),
            "named": model(chat_template="gemma"),
            "inline": model(chat_template=JINJA),
            "filed": model(chat_template="tmpl/chat.jinja"),
            "absolute": model(chat_template=str(tmp_path / "tmpl" / "chat.jinja")),
            "dotted": model(chat_template="./gemma"),
        },
    )
    got = {name: m.chat_template for name, m in models.items()}
    assert got == {
        "own": "",
        "named": "gemma",
        "inline": JINJA,
        "filed": JINJA,
        "absolute": JINJA,
        "dotted": JINJA,
    }
    assert {chat_templates.kind(v) for v in got.values()} == {"", "builtin", "jinja"}


@pytest.mark.parametrize(
    ("value", "args", "says"),
    [
        ("gemma3", [], "is neither a built-in template"),
        ("sub/none.jinja", [], "no such file"),
        ("big.jinja", [], "over 128 KiB"),
        ("plain.txt", [], "no Jinja in it"),
        ("latin1.jinja", [], "not UTF-8"),
        ("sub", [], "cannot read"),  # a folder
        ("gemma", ["--chat-template", "chatml"], "args sets --chat-template too"),
        (JINJA, ["--chat-template-file=/t.jinja"], "args sets --chat-template-file too"),
        ("gemma", ["--jinja"], "runs with --no-jinja"),
        (JINJA, ["--no-jinja"], "needs Jinja"),
    ],
)
def test_a_bad_template_stops_loading_naming_the_key(tmp_path, value, args, says):
    (tmp_path / "sub").mkdir()
    (tmp_path / "big.jinja").write_text("{{ x }}" * (chat_templates.MAX_TEMPLATE_BYTES // 7 + 1))
    (tmp_path / "plain.txt").write_text("no template here")
    (tmp_path / "latin1.jinja").write_bytes("{{ 'caf\xe9' }}".encode("latin-1"))
    with pytest.raises(ConfigError) as e:
        load_models(tmp_path, {"m": model(chat_template=value, args=args)})
    assert "models.m.chat_template" in str(e.value) and says in str(e.value), str(e.value)


def test_an_unknown_name_is_answered_with_the_builtin_list(tmp_path):
    with pytest.raises(ConfigError) as e:
        load_models(tmp_path, {"m": model(chat_template="gemma3")})
    listed = str(e.value).split("one of: ")[1].split(")")[0].split(", ")
    assert listed == list(chat_templates.BUILTIN)


def test_the_launch_fingerprint_follows_the_template(tmp_path):
    plain = parse({"models": {"m": model()}}).models["m"]
    # a model without a template keeps the fingerprint it had before templates existed,
    # so upgrading does not replace every running instance
    before = (plain.url, "", plain.ctx_size, plain.args, plain.embeddings)
    assert launch_fingerprint(plain) == hashlib.sha256(msgspec.json.encode(before)).hexdigest()[:16]
    prints = {launch_fingerprint(plain)}
    for value in ("gemma", "chatml", JINJA, JINJA + " "):
        prints.add(launch_fingerprint(msgspec.structs.replace(plain, chat_template=value)))
    assert len(prints) == 5
    # a file's text counts, not its path: an edited file changes it at the next load
    (tmp_path / "t.jinja").write_text(JINJA)
    first = launch_fingerprint(load_models(tmp_path, {"m": model(chat_template="t.jinja")})["m"])
    (tmp_path / "t.jinja").write_text(JINJA + "\n")
    second = launch_fingerprint(load_models(tmp_path, {"m": model(chat_template="t.jinja")})["m"])
    assert first != second


# ------------------------------------------------------------------ agent


def argv_of(**kw: str) -> list[str]:
    return build_argv(
        "/m.gguf", alias="m", host="127.0.0.1", port=1, ctx_size=8, n_gpu_layers=0, **kw
    )


def test_argv_passes_a_builtin_without_jinja_and_a_file_with_it():
    named = argv_of(chat_template="gemma")
    i = named.index("--chat-template")
    assert named[i - 1 : i + 2] == ["--no-jinja", "--chat-template", "gemma"]
    filed = argv_of(chat_template_file="/store/.chat-templates/a.jinja")
    i = filed.index("--chat-template-file")
    assert filed[i - 1 : i + 2] == [
        "--jinja",
        "--chat-template-file",
        "/store/.chat-templates/a.jinja",
    ]
    own = argv_of()
    assert not {"--jinja", "--no-jinja", "--chat-template", "--chat-template-file"} & set(own)


def test_the_agent_names_the_template_file_by_its_content_inside_its_store(tmp_path):
    rel = chat_templates.write_template(tmp_path, JINJA)
    path = (tmp_path / rel).resolve()
    assert path.parent == (tmp_path / chat_templates.TEMPLATE_DIR).resolve()
    assert path.read_text() == JINJA and oct(path.stat().st_mode & 0o777) == "0o644"
    assert chat_templates.write_template(tmp_path, JINJA) == rel  # once per content
    assert chat_templates.write_template(tmp_path, JINJA + " ") != rel
    assert Store(tmp_path).scan() == []  # not a model file, and in a folder the scan skips


def test_the_agent_runs_only_its_own_configs_template():
    cfg = parse({"models": {"m": model(chat_template="gemma"), "o": model()}})

    def start(name: str, template: str) -> proto.StartInstance:
        filename = store_filename_of(name, cfg.models[name])
        return proto.StartInstance(
            cmd_id="c", instance_id=f"{name}-0123abcd", model=name, filename=filename,
            n_gpu_layers=0, chat_template=template, api_key=instance_key.new_key(),
        )  # fmt: skip

    assert refusal(start("m", "gemma"), cfg) is None
    assert refusal(start("o", ""), cfg) is None
    for cmd in (start("m", JINJA), start("m", ""), start("o", "chatml")):
        assert "chat template in the command" in (refusal(cmd, cfg) or "")


def test_a_start_without_a_template_stays_readable_by_older_agents():
    cmd = proto.StartInstance(
        cmd_id="c", instance_id="m-0123abcd", model="m", filename="f", n_gpu_layers=0
    )
    assert b"chat_template" not in proto.encode(cmd)
    sent = msgspec.structs.replace(cmd, chat_template=JINJA)
    assert proto.decode(proto.encode(sent), proto.AgentCommand).chat_template == JINJA


# ------------------------------------------------------------------ header and warning


def test_the_header_says_whether_the_gguf_has_a_template(tmp_path):
    write_gguf(tmp_path / "with.gguf", 0)
    write_gguf(tmp_path / "without.gguf", 0, chat_template=None)
    assert read_summary(tmp_path / "with.gguf").has_chat_template is True
    assert read_summary(tmp_path / "without.gguf").has_chat_template is False
    # a summary from an older reader does not say: it warns of nothing
    old = msgspec.json.encode(
        {
            k: v
            for k, v in msgspec.to_builtins(read_summary(tmp_path / "without.gguf")).items()
            if k != "has_chat_template"
        }
    )
    assert msgspec.json.decode(old, type=proto.GgufSummary).has_chat_template is True


def summary(has: bool) -> proto.GgufSummary:
    return proto.GgufSummary(
        architecture="llama", n_layers=2, n_ctx_train=2048, n_embd=64, n_head=4,
        n_head_kv=4, head_dim_k=16, head_dim_v=16, has_chat_template=has,
    )  # fmt: skip


def test_a_gguf_without_template_and_none_configured_is_warned_of():
    configured = {"bare": "", "fixed": "gemma", "own": ""}
    headers = [
        ("bare", summary(False)),
        ("fixed", summary(False)),
        ("own", summary(True)),
        ("unread", None),
        ("unconfigured", summary(False)),
    ]
    warned = chat_templates.warnings(configured | {"unread": ""}, headers)
    assert list(warned) == ["bare"] and "set models.bare.chat_template" in warned["bare"]


def host_with_files() -> proto.HostRecord:
    files = [
        proto.FileInfo(model=name, filename=f"{name}.gguf", size=1, gguf=summary(False))
        for name in ("bare", "fixed")
    ]
    return msgspec.structs.replace(host("h1"), files=files)


def test_the_dashboard_view_carries_the_warning_on_the_models_file():
    view = View()
    view.set_models(
        parse({"models": {"bare": model(), "fixed": model(chat_template="chatml")}}).models
    )
    view.apply_kv(proto.KV_HOSTS, "h1", msgspec.to_builtins(host_with_files()))
    files = {f["model"]: f for f in view.snapshot()["hosts"]["h1"]["files"]}
    assert "set models.bare.chat_template" in files["bare"]["warning"]
    assert "warning" not in files["fixed"] and "gguf" not in files["bare"]


@pytest.mark.browser
async def test_the_dashboard_marks_the_model_and_says_why(bus, start_ui):  # noqa: F811
    require("Chromium", HAVE_CHROMIUM, "apt-get install chromium")
    from playwright.async_api import async_playwright, expect

    await bus.put(bus.hosts, "h1", host_with_files())
    base = await start_ui({"bare": model(), "fixed": model(chat_template="chatml")})
    async with async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = await browser.new_page(extra_http_headers=GATEWAY)
            await page.goto(base + "/dashboard")
            bare = page.locator('[data-model="bare"] td').first
            await expect(bare).to_have_class(re.compile(r"\bmodel-warn\b"), timeout=5000)
            await expect(bare).to_have_attribute(
                "title", re.compile("set models.bare.chat_template")
            )
            await expect(bare).to_have_text("bare")  # the mark is CSS, the name stays the name
            fixed = page.locator('[data-model="fixed"] td').first
            await expect(fixed).to_have_text("fixed")
            assert "model-warn" not in (await fixed.get_attribute("class") or "")
        finally:
            await browser.close()


# ------------------------------------------------------------------ a real stack


@dataclass
class Ready:
    endpoint: str
    key: str  # its API key, as the placer issued it


async def ready_instances(nats_url: str) -> dict[str, Ready]:
    """Each model's ready instance, with its key (read as the operator: hosts cannot)."""
    bus = await connect(nats_url, "test")
    try:
        recs = await kv_snapshot(bus, bus.instances, proto.InstanceRecord)
        out = {}
        for r in recs.values():
            if r.state == proto.InstanceState.READY and r.endpoint:
                placed = await instance_key.read(bus, r.host or "", r.instance_id)
                out[r.model] = Ready(r.endpoint, placed.key if placed else "")
        return out
    finally:
        await bus.close()


def test_instances_apply_the_configured_templates(tmp_path, nats_url, llama_server_bin, tiny_gguf):
    write_gguf(tmp_path / "bare.gguf", 9, chat_template=None)
    (tmp_path / "chat.jinja").write_text(JINJA)  # beside the stack's config.yaml
    models = {
        "filed": {"url": f"file://{tiny_gguf(8)}", "ctx_size": 256, "chat_template": "chat.jinja"},
        "named": {"url": f"file://{tiny_gguf(8)}", "ctx_size": 256, "chat_template": "gemma"},
        "bare": {"url": f"file://{tmp_path / 'bare.gguf'}", "ctx_size": 256},
    }
    stack = Stack(tmp_path, nats_url, models)
    stack.start()
    try:

        def show(name: str) -> httpx.Response:
            return httpx.post(f"{stack.base}/api/show", json={"model": name}, timeout=10)

        assert show("bare").json()["template"] == ""  # nothing configured, nothing running
        for name in models:
            r = httpx.post(
                f"{stack.base}/v1/chat/completions",
                json={"model": name, "messages": HI, "max_tokens": 1},
                timeout=60,
            )
            assert r.status_code == 200, r.text
        ready = asyncio.run(ready_instances(nats_url))

        def applied(name: str) -> str:
            rec = ready[name]
            r = httpx.post(
                f"{rec.endpoint}/apply-template",
                json={"messages": HI},
                headers={"Authorization": f"Bearer {rec.key}"},
                timeout=10,
            )
            assert r.status_code == 200, r.text
            return r.json()["prompt"]

        assert applied("filed") == "[user]hi[assistant]"
        assert applied("named") == GEMMA_HI
        assert applied("bare").startswith("<|im_start|>user\nhi<|im_end|>")  # the fallback
        # the Jinja text went into the agent's store under a name of its own
        [written] = (tmp_path / "store" / chat_templates.TEMPLATE_DIR).glob("*.jinja")
        assert written.read_text() == JINJA

        assert show("filed").json()["template"] == JINJA
        assert show("named").json()["template"] == "gemma"
        assert "<|im_start|>" in show("bare").json()["template"]  # the instance's /props

        # the warning, once the agent's heartbeat has read the file's header
        deadline = time.monotonic() + 20
        while "set models.bare.chat_template" not in stack.logs():
            assert time.monotonic() < deadline, "the agent never warned of bare"
            time.sleep(0.2)
        ps = run_lls(stack, "ps")
        assert ps.returncode == 0, ps.stderr
        warned = [line for line in ps.stdout.splitlines() if "chat_template" in line]
        assert warned == [f"warning: {chat_templates.warning('bare')}"]
        time.sleep(2.5)  # more heartbeats (one a second) read the same file: no more lines
        assert stack.logs().count("set models.bare.chat_template") == 1
    finally:
        stack.stop()


@pytest.mark.docker
async def test_a_docker_instance_reads_the_template_from_the_mounted_store(
    agents: Agents,  # noqa: F811
    docker_client,  # noqa: ANN001
    docker_host: str,  # noqa: F811
    bus,  # noqa: ANN001
    tmp_path: Path,
    tiny_gguf,  # noqa: ANN001
) -> None:
    cfg = agent_config(tmp_path, docker_host, runtime="docker")
    cfg["models"] = MODELS | {"tiny": MODELS["tiny"] | {"chat_template": JINJA}}
    filename = put_model(tmp_path, tiny_gguf(1), "tiny")
    await agents.start(parse(cfg), docker_host)
    iid = new_iid()
    await place(bus, docker_host, start_cmd(iid, filename, memory_mib=600, chat_template=JINJA))
    rec = await wait_state(
        bus, iid, proto.InstanceState.READY, proto.InstanceState.FAILED, within=60
    )
    assert rec.state == proto.InstanceState.READY, rec.reason + rec.log_tail
    [c] = our_containers(docker_client, docker_host)
    inside = f"/models/{chat_templates.template_filename(JINJA)}"
    assert c.attrs["Args"][c.attrs["Args"].index("--chat-template-file") + 1] == inside
    async with httpx.AsyncClient(timeout=10) as http:
        r = await http.post(
            f"{rec.endpoint}/apply-template",
            json={"messages": HI},
            headers={"Authorization": f"Bearer {key_for(iid)}"},
        )
    assert r.status_code == 200 and r.json()["prompt"] == "[user]hi[assistant]", r.text
