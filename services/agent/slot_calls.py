"""Warm swaps, the agent's side: the authenticated calls to an instance's llama-server
(GET /props and /slots: how many slots it has; POST /slots/<i>?action=save|restore), saves
before it stops and restores once it answers /health, each within its deadline and never
failing the instance. slot_cache.py holds the pure parts (naming, keying, eviction) and the
file operations (README: Warm swaps)."""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path
from typing import Any

import httpx

import proto
from lls.config import AgentConfig, Config, slots_of
from services.agent import slot_cache
from services.agent.blocking import BlockingPool
from services.agent.instance import Instance
from services.agent.runtime import local_url_host

log = logging.getLogger(__name__)

# Deadlines for all of one instance's slot saves and restores. A stop waits
# lifecycle.STOP_WAIT_S for the instance to end: the save plus STOP_GRACE_S fit well inside it.
SLOT_SAVE_S = 10.0
SLOT_SAVE_SHUTDOWN_S = 3.0  # the agent's own shutdown waits STOP_GRACE_S + 5 s in all
SLOT_RESTORE_S = 10.0


class SlotError(RuntimeError):
    """llama-server answered a slot save or restore with an error."""

    def __init__(self, status: int, message: str):
        super().__init__(f"HTTP {status}: {message}")
        self.status = status


class SlotCalls:
    """Slot calls to this host's instances and the host's slot cache folder."""

    def __init__(
        self,
        config: Config,
        host: str,
        bind: str,
        store_root: Path,
        http: httpx.AsyncClient,
        pool: BlockingPool,
    ):
        self.config = config
        self.cfg: AgentConfig = config.agent
        self.host = host
        self.bind = bind
        self.http = http
        self.pool = pool
        self.slot_dir = slot_cache.cache_dir(self.cfg.slot_cache_dir, store_root, host)

    async def prepare(self) -> None:
        """At agent start: slot_cache.prepare on the folder (leftovers of cut-short saves
        removed, the size bound kept)."""
        try:
            await self.pool.call(slot_cache.prepare, self.slot_dir, self.cfg.slot_cache_mib)
        except OSError as e:  # the cache is an optimisation: never a reason not to run
            log.warning("slot cache folder %s: %s", self.slot_dir, e)

    async def dir_ready(self) -> str:
        """The slot cache folder, made if need be; "" when warm swaps are off (or the folder
        cannot be made: the instance then simply starts and stops cold)."""
        if not self.cfg.slot_cache_mib:
            return ""
        try:
            await self.pool.call(
                lambda: self.slot_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
            )
        except OSError as e:
            log.warning("slot cache folder %s: %s; warm swaps off", self.slot_dir, e)
            return ""
        return str(self.slot_dir)

    async def request(
        self, inst: Instance, method: str, path: str, timeout: float, body: Any = None
    ) -> Any:
        """An authenticated call to the instance's llama-server; its JSON answer."""
        h = inst.handle
        if h is None:
            raise SlotError(0, "the instance has no server")
        url = f"http://{local_url_host(self.bind)}:{h.port}{path}"
        key = inst.api_key
        if not key:
            raise SlotError(0, "its API key is not known (adopted from a server without one)")
        r = await self.http.request(
            method,
            url,
            json=body,
            headers={"Authorization": f"Bearer {key}"},
            timeout=max(0.1, timeout),
        )
        if r.status_code != 200:
            try:
                message = str(r.json()["error"]["message"])
            except (ValueError, KeyError, TypeError):
                message = r.text[:200]
            raise SlotError(r.status_code, message)
        return r.json()

    async def n_slots(self, inst: Instance) -> int:
        """How many slots the server has: known once it was ready, else its own word (GET
        /props: total_slots; GET /slots where /props does not say), else what the model's
        -np says (llama-server's own default when it has none)."""
        if inst.slots:
            return inst.slots
        for path in ("/props", "/slots"):
            try:
                ans = await self.request(inst, "GET", path, 2.0)
            except (httpx.HTTPError, SlotError, ValueError) as e:
                log.info("%s: GET %s: %s", inst.instance_id, path, e)
                continue
            n = ans.get("total_slots") if isinstance(ans, dict) else len(ans)
            if isinstance(n, int) and n > 0:
                inst.slots = min(n, slot_cache.MAX_SLOTS)
                return inst.slots
        mcfg = self.config.models.get(inst.model)
        return slots_of(mcfg) if mcfg is not None else 1

    async def save(
        self, inst: Instance, budget_s: float, why: str
    ) -> proto.SlotCacheChanged | None:
        """Save every slot that holds tokens, within `budget_s`; the event to emit, if any.
        Never raises: the stop goes on whatever happens here."""
        folder, t0 = self.slot_dir, time.monotonic()
        saved = tokens = nbytes = 0
        errors: list[str] = []
        try:
            async with asyncio.timeout(budget_s):
                for slot in await self._to_save(inst):
                    temp = slot_cache.temp_file(inst.instance_id, slot)
                    left = budget_s - (time.monotonic() - t0)
                    try:
                        ans = await self.request(
                            inst, "POST", f"/slots/{slot}?action=save", left, {"filename": temp}
                        )
                        n, written = int(ans.get("n_saved", 0)), int(ans.get("n_written", 0))
                    except (httpx.HTTPError, SlotError, ValueError, TypeError) as e:
                        errors.append(f"slot {slot}: {e or type(e).__name__}")
                        continue
                    if n <= 0:  # an empty slot: nothing worth a file
                        await self.pool.call(slot_cache.discard, folder, temp)
                        continue
                    final = slot_cache.slot_file(inst.slot_key, slot)
                    try:
                        await self.pool.call(slot_cache.commit, folder, temp, final)
                    except OSError as e:
                        errors.append(f"slot {slot}: {e}")
                        continue
                    saved, tokens, nbytes = saved + 1, tokens + n, nbytes + written
        except TimeoutError:
            errors.append(f"the {budget_s:g} s deadline passed")
        except Exception as e:  # noqa: BLE001 - a save must never hold up the stop
            errors.append(f"agent error: {e}")
        took = round(time.monotonic() - t0, 3)
        if not saved and not errors:
            log.info("%s: no slot holds tokens; nothing saved", inst.instance_id)
            return None
        stage = "saved" if saved else "failed"
        reason = why + (f"; not saved: {'; '.join(errors)}" if errors else "")
        (log.warning if errors else log.info)(
            "%s: slot cache %s: %d slot(s), %d tokens, %d bytes in %.3f s (%s)",
            inst.instance_id,
            stage,
            saved,
            tokens,
            nbytes,
            took,
            reason,
        )
        return self._event(inst, stage, saved, tokens, nbytes, took, reason)

    async def _to_save(self, inst: Instance) -> list[int]:
        """The slots worth a file (slot_cache.worth_saving), else every slot it has."""
        try:
            ids = slot_cache.worth_saving(await self.request(inst, "GET", "/slots", 2.0))
        except (httpx.HTTPError, SlotError, ValueError) as e:
            log.info("%s: GET /slots: %s", inst.instance_id, e)
            ids = None
        return ids if ids is not None else list(range(await self.n_slots(inst)))

    async def idle(self, inst: Instance) -> bool:
        """Whether no slot of the instance's server is processing a request (GET /slots);
        False when it cannot tell."""
        try:
            return slot_cache.all_idle(await self.request(inst, "GET", "/slots", 2.0))
        except (httpx.HTTPError, SlotError, ValueError):
            return False

    def after_save(self, instance_id: str) -> None:
        """Once the server is gone: its unfinished temporary files, then the size bound."""
        names = [f.name for f in slot_cache.scan(self.slot_dir)]
        slot_cache.discard(self.slot_dir, *slot_cache.temps_of(instance_id, names))
        slot_cache.prune(self.slot_dir, self.cfg.slot_cache_mib)

    async def restore(self, inst: Instance) -> proto.SlotCacheChanged | None:
        """Slot i from file i of this launch's key, within SLOT_RESTORE_S; the event to emit,
        if any. A failure leaves the instance cold, never unready. Files are kept after a
        restore (README: Warm swaps)."""
        folder, t0 = self.slot_dir, time.monotonic()
        try:
            names = [f.name for f in await self.pool.call(slot_cache.scan, folder)]
        except OSError as e:
            log.warning("%s: slot cache unreadable: %s", inst.instance_id, e)
            return None
        if not slot_cache.restorable(inst.slot_key, names, slot_cache.MAX_SLOTS):
            return None  # nothing saved for this launch: no /slots call, no event
        restored = tokens = nbytes = 0
        errors: list[str] = []
        try:
            async with asyncio.timeout(SLOT_RESTORE_S):
                files = slot_cache.restorable(inst.slot_key, names, await self.n_slots(inst))
                for slot, name in sorted(files.items()):
                    if inst.stop_reason is not None:
                        break
                    left = SLOT_RESTORE_S - (time.monotonic() - t0)
                    try:
                        ans = await self.request(
                            inst, "POST", f"/slots/{slot}?action=restore", left, {"filename": name}
                        )
                    except SlotError as e:
                        errors.append(f"slot {slot}: {e}")
                        if 400 <= e.status < 500:  # unreadable for this server: it stays so
                            await self.pool.call(slot_cache.discard, folder, name)
                        continue
                    except (httpx.HTTPError, ValueError) as e:
                        errors.append(f"slot {slot}: {e or type(e).__name__}")
                        continue
                    await self.pool.call(slot_cache.touch, folder, name)
                    restored += 1
                    tokens += int(ans.get("n_restored", 0))
                    nbytes += int(ans.get("n_read", 0))
        except TimeoutError:
            errors.append(f"the {SLOT_RESTORE_S:g} s deadline passed")
        except Exception as e:  # noqa: BLE001 - a restore must never keep it from READY
            errors.append(f"agent error: {e}")
        took = round(time.monotonic() - t0, 3)
        if not restored and not errors:
            return None
        stage = "restored" if restored else "failed"
        reason = "; ".join(errors) if errors else ""
        (log.warning if errors else log.info)(
            "%s: slot cache %s: %d slot(s), %d tokens, %d bytes in %.3f s %s",
            inst.instance_id,
            stage,
            restored,
            tokens,
            nbytes,
            took,
            reason,
        )
        return self._event(inst, stage, restored, tokens, nbytes, took, reason)

    def _event(
        self,
        inst: Instance,
        stage: str,
        slots: int,
        tokens: int,
        nbytes: int,
        seconds: float,
        reason: str,
    ) -> proto.SlotCacheChanged:
        return proto.SlotCacheChanged(
            model=inst.model,
            host=self.host,
            instance_id=inst.instance_id,
            stage=stage,
            slots=slots,
            tokens=tokens,
            bytes=nbytes,
            seconds=seconds,
            reason=reason[:1000],
        )
