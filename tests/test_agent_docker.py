"""The agent's Docker runtime on a real engine: a local llama-server image built from the
cached binary (no registry here), containers on the host network, label-based adoption.

Host ids are unique per test and adoption also matches the store path, so these tests never
touch containers of other agents on the same engine; teardown removes whatever is left.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from test_agent import (
    ADOPTED,
    Agents,
    agent_config,
    agents,  # noqa: F401 - fixture
    chat,
    chat_ok,
    get_record,
    key_for,
    new_iid,
    place,
    put_model,
    put_record,
    start_cmd,
    unique_host,
    wait_state,
)

import proto
from lls.bus import Bus, new_id
from lls.config import parse
from proto import InstanceState, StopInstance

pytestmark = pytest.mark.docker


def our_containers(client, host: str) -> list:  # noqa: ANN001
    return client.containers.list(all=True, filters={"label": f"lls.host={host}"})


@pytest.fixture
def docker_host(docker_client) -> Iterator[str]:  # noqa: ANN001
    host = unique_host()
    yield host
    for c in our_containers(docker_client, host):
        c.remove(force=True)


async def test_docker_instance_starts_serves_and_stops_leaving_no_container(
    agents: Agents,  # noqa: F811
    docker_client,  # noqa: ANN001
    docker_host: str,
    bus: Bus,
    tmp_path: Path,
    tiny_gguf: Callable[[int], Path],
) -> None:
    filename = put_model(tmp_path, tiny_gguf(1), "tiny")
    agent = await agents.start(
        parse(agent_config(tmp_path, docker_host, runtime="docker")), docker_host
    )
    assert agent.task.done() is False
    iid = new_iid()
    await place(bus, docker_host, start_cmd(iid, filename, gpus=[0], memory_mib=600))

    rec = await wait_state(bus, iid, InstanceState.READY, InstanceState.FAILED, within=60)
    assert rec.state == InstanceState.READY, rec.reason + rec.log_tail
    assert (await chat(rec.endpoint, "tiny", None)).status_code == 401  # no key, no service
    await chat_ok(rec.endpoint, "tiny", key_for(iid))
    [c] = our_containers(docker_client, docker_host)
    assert c.status == "running" and c.attrs["HostConfig"]["NetworkMode"] == "host"
    assert c.labels["lls.instance"] == iid and c.labels["lls.model"] == "tiny"
    assert c.image.tags and c.image.tags[0].startswith("lls-llama-server:")
    mounts = {m["Destination"]: m["RW"] for m in c.attrs["Mounts"]}
    assert mounts == {"/models": False, "/lls-slots": True}  # store ro; slot cache (warm swaps)
    assert f"/models/{filename}" in c.attrs["Args"]
    assert not c.attrs["HostConfig"].get("DeviceRequests")  # simulated GPUs: nothing to pass
    hc = c.attrs["HostConfig"]
    assert hc["SecurityOpt"] == ["no-new-privileges:true"] and hc["CapDrop"] == ["ALL"]
    assert hc["PidsLimit"] > 0 and hc["LogConfig"]["Config"]["max-size"]
    assert key_for(iid) not in " ".join(c.attrs["Args"])  # key in env, not argv
    assert c.labels["lls.cluster"]

    await bus.command(proto.cmd_agent(docker_host), StopInstance(cmd_id=new_id(), instance_id=iid))
    rec = await wait_state(bus, iid, InstanceState.STOPPED, within=20)
    assert our_containers(docker_client, docker_host) == []


async def test_docker_agent_restart_adopts_its_labelled_container_and_stops_unwanted_ones(
    agents: Agents,  # noqa: F811
    docker_client,  # noqa: ANN001
    docker_host: str,
    bus: Bus,
    tmp_path: Path,
    tiny_gguf: Callable[[int], Path],
) -> None:
    a = put_model(tmp_path, tiny_gguf(1), "a")
    b = put_model(tmp_path, tiny_gguf(2), "b")
    cfg = parse(agent_config(tmp_path, docker_host, runtime="docker"))
    agent = await agents.start(cfg, docker_host)
    kept, unwanted = new_iid("a"), new_iid("b")
    await place(bus, docker_host, start_cmd(kept, a, model="a"))
    await place(bus, docker_host, start_cmd(unwanted, b, model="b"))
    ready = await wait_state(bus, kept, InstanceState.READY, within=60)
    await wait_state(bus, unwanted, InstanceState.READY, within=60)
    ids = {c.labels["lls.instance"]: c.id for c in our_containers(docker_client, docker_host)}
    assert set(ids) == {kept, unwanted}

    await agent.crash()  # containers outlive the agent
    await put_record(bus, unwanted, "b", InstanceState.STOPPED, docker_host, reason="idle")
    agent = await agents.start(cfg, docker_host)

    adopted = await wait_state(bus, kept, InstanceState.READY, reason=ADOPTED)
    assert adopted.endpoint == ready.endpoint
    await chat_ok(adopted.endpoint, "a", key_for(kept))
    left = our_containers(docker_client, docker_host)
    assert [c.id for c in left] == [ids[kept]]  # same container, the unwanted one is gone
    assert (await get_record(bus, unwanted)).state == InstanceState.STOPPED

    await agent.stop()  # graceful: nothing left behind
    assert (await get_record(bus, kept)).state == InstanceState.STOPPED
    assert our_containers(docker_client, docker_host) == []
    await asyncio.sleep(0)
