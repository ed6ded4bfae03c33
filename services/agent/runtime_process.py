"""Plain-process runtime: llama-server as a child process in its own session.

Each instance leaves a state file (pid, port, model, start time) and its log in the run dir,
so a restarted agent finds what an earlier one started. The run dir is per cluster id and host
id, and state files name both, so two stacks on one machine never adopt or stop each other's
servers. Instance ids are checked against proto.INSTANCE_ID_RE before they become file names. The process's kernel start time is
kept with the pid so that a recycled pid is never mistaken for our server (nor signalled).
"""

from __future__ import annotations

import functools
import json
import logging
import os
import signal
import subprocess
import time
from pathlib import Path

import proto
from lls.paths import UNKNOWN
from services.agent.runtime import (
    LOG_TAIL_LINES,
    Handle,
    LaunchError,
    LaunchSpec,
    bounded_tail,
    build_argv,
    gpu_env,
    minimal_env,
    tail_lines,
)

log = logging.getLogger(__name__)


def proc_status(pid: int) -> tuple[str, int] | None:
    """(state letter, start time in clock ticks) of a live process, None if there is none."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2 :].split()  # the command name may hold spaces
    return fields[0], int(fields[19])


def environ(pid: int) -> dict[str, str]:
    """A process's environment (readable for our own user's processes); {} when unreadable.
    An adopted server's API key is read back from here, so it is never written to disk."""
    try:
        raw = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return {}
    pairs = (kv.split(b"=", 1) for kv in raw.split(b"\0") if b"=" in kv)
    return {k.decode(errors="replace"): v.decode(errors="replace") for k, v in pairs}


def alive(pid: int, start_ticks: int | None) -> bool:
    st = proc_status(pid)
    return st is not None and st[0] not in "ZX" and (start_ticks is None or st[1] == start_ticks)


@functools.lru_cache(maxsize=8)
def supports_fit(binary: str, mtime_ns: int) -> bool:
    """Whether this llama-server build knows `--fit` (older builds reject unknown flags)."""
    try:
        out = subprocess.run(
            [binary, "--help"], capture_output=True, text=True, timeout=5, check=False
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return "--fit " in out.stdout + out.stderr


def read_tail(path: Path, lines: int = LOG_TAIL_LINES, max_bytes: int = 64 * 1024) -> str:
    try:
        with path.open("rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - max_bytes))
            return tail_lines(f.read().decode(errors="replace"), lines)
    except OSError:
        return ""


class ProcessRuntime:
    name = "process"

    def __init__(
        self,
        host_id: str,
        store: Path,
        run_dir: Path,
        binary: Path | None,
        cluster_id: str = "",
        backend: str = UNKNOWN,  # the binary's (lls.paths.choose_llama_server)
    ):
        self.host_id = host_id
        self.cluster_id = cluster_id
        self.store = store
        self.run_dir = run_dir
        self.binary = binary
        self.program = str(binary or "")
        self.backend = backend
        self._children: dict[str, subprocess.Popen[bytes]] = {}
        self._ticks: dict[str, int | None] = {}

    def has_binary(self) -> bool:
        return self.binary is not None and os.access(self.binary, os.X_OK)

    def use(self, binary: Path, backend: str) -> None:
        """Run `binary` from now on: the build `make run` started has finished."""
        self.binary, self.program, self.backend = binary, str(binary), backend

    def _state_file(self, instance_id: str) -> Path:
        if not proto.INSTANCE_ID_RE.fullmatch(instance_id):  # never a path
            raise LaunchError(f"bad instance id {instance_id!r}")
        return self.run_dir / f"{instance_id}.json"

    def _log_file(self, instance_id: str) -> Path:
        return self._state_file(instance_id).with_suffix(".log")

    def launch(self, spec: LaunchSpec) -> Handle:
        binary = self.binary
        if binary is None or not os.access(binary, os.X_OK):
            raise LaunchError(
                f"llama-server binary not found ({binary or 'none configured'}): set "
                "agent.llama_server or run scripts/build-llama-server.sh"
            )
        argv = [str(binary)] + build_argv(
            str(self.store / spec.filename),
            alias=spec.model,
            host=spec.bind_host,
            port=spec.port,
            ctx_size=spec.ctx_size,
            n_gpu_layers=spec.n_gpu_layers,
            n_gpus=len(spec.gpus),
            embeddings=spec.embeddings,
            args=spec.args,
            fit_off=supports_fit(str(binary), binary.stat().st_mtime_ns),
            cpu_count=os.cpu_count() or 1,
            http_threads=spec.http_threads,
            cpu_compute=spec.cpu_compute,
            slot_save_path=spec.slot_dir,
            chat_template=spec.chat_template,
            chat_template_file=str(self.store / spec.chat_template_file)
            if spec.chat_template_file
            else "",
        )
        log_file = self._log_file(spec.instance_id)
        self.run_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        env = minimal_env(gpu_env(spec) | {"LLAMA_API_KEY": spec.api_key})
        with log_file.open("wb") as logf:
            # own session: a Ctrl-C meant for the agent must not reach the servers, which
            # the agent stops itself (and a killed agent leaves them for the next to adopt)
            proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=logf,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=self.run_dir,
                start_new_session=True,
            )
        st = proc_status(proc.pid)
        ticks = st[1] if st else None
        state = {
            "instance_id": spec.instance_id,
            "host": self.host_id,
            "cluster": self.cluster_id,
            "model": spec.model,
            "pid": proc.pid,
            "port": spec.port,
            "start_ticks": ticks,
            "argv": argv,
            "slot_key": spec.slot_key,
        }
        tmp = self._state_file(spec.instance_id).with_suffix(".json.tmp")
        tmp.write_text(json.dumps(state))
        os.replace(tmp, self._state_file(spec.instance_id))
        self._children[spec.instance_id] = proc
        self._ticks[spec.instance_id] = ticks
        log.info("launched %s (pid %d): %s", spec.instance_id, proc.pid, " ".join(argv))
        return Handle(
            spec.instance_id,
            spec.model,
            spec.port,
            pid=proc.pid,
            slot_key=spec.slot_key,
            api_key=spec.api_key,
        )

    def exit_code(self, h: Handle) -> int | None:
        proc = self._children.get(h.instance_id)
        if proc is not None:
            return proc.poll()
        assert h.pid is not None
        return None if alive(h.pid, self._ticks.get(h.instance_id)) else -1  # not our child

    def log_tail(self, h: Handle, lines: int = LOG_TAIL_LINES) -> str:
        return read_tail(self._log_file(h.instance_id), lines)

    def log_lines(self, h: Handle, lines: int, max_bytes: int) -> tuple[list[str], bool]:
        # The path comes from the handle's checked id (_state_file), never from a request.
        try:
            with self._log_file(h.instance_id).open("rb") as f:
                start = max(0, f.seek(0, os.SEEK_END) - max_bytes)
                f.seek(start)
                data = f.read(max_bytes)
        except OSError:  # released meanwhile: its log went with it
            return [], False
        return bounded_tail(data, lines, max_bytes, mid_line=start > 0, more=start > 0)

    def stop(self, h: Handle, grace_s: float) -> None:
        proc = self._children.get(h.instance_id)
        if proc is not None:
            if proc.poll() is None and grace_s <= 0:  # nothing to finish: no grace
                proc.kill()
                proc.wait(10)
            elif proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(grace_s)
                except subprocess.TimeoutExpired:
                    log.warning("%s ignored SIGTERM for %.0f s; killing it", h.instance_id, grace_s)
                    proc.kill()
                    proc.wait(10)
        elif h.pid is not None:
            self._signal_adopted(h, grace_s)
        self.release(h)

    def _signal_adopted(self, h: Handle, grace_s: float) -> None:
        assert h.pid is not None
        ticks = self._ticks.get(h.instance_id)
        for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 10.0)):
            if not alive(h.pid, ticks):
                return
            try:
                os.kill(h.pid, sig)
            except ProcessLookupError:
                return
            deadline = time.monotonic() + wait_s
            while time.monotonic() < deadline and alive(h.pid, ticks):
                time.sleep(0.05)
        if alive(h.pid, ticks):
            log.error("%s (pid %d) survived SIGKILL", h.instance_id, h.pid)

    def release(self, h: Handle) -> None:
        proc = self._children.pop(h.instance_id, None)
        if proc is not None:
            proc.poll()  # reap
        self._ticks.pop(h.instance_id, None)
        self._state_file(h.instance_id).unlink(missing_ok=True)
        self._log_file(h.instance_id).unlink(missing_ok=True)

    def discover(self) -> list[Handle]:
        found = []
        for path in sorted(self.run_dir.glob("*.json")):
            try:
                st = json.loads(path.read_text())
                iid, pid = str(st["instance_id"]), int(st["pid"])
                ticks = st.get("start_ticks")
                port, model = int(st["port"]), str(st["model"])
            except (OSError, ValueError, KeyError, TypeError):
                log.warning("ignoring unreadable state file %s", path)
                path.unlink(missing_ok=True)
                continue
            if st.get("host") != self.host_id or st.get("cluster") != self.cluster_id:
                continue  # another host id or another stack's: not ours to adopt or stop
            if not proto.INSTANCE_ID_RE.fullmatch(iid):
                log.warning("ignoring state file %s with a bad instance id", path)
                continue
            h = Handle(iid, model, port, pid=pid, slot_key=str(st.get("slot_key") or ""))
            if alive(pid, ticks):
                self._ticks[iid] = ticks
                h.api_key = environ(pid).get("LLAMA_API_KEY", "")
                found.append(h)
            else:
                self.release(h)  # it died while no agent watched; the agent marks it failed
        return found
