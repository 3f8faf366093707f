"""One driver per sweep. A driver holds `driver.lock` in the sweep's directory on its storage (so a
driver on another machine sharing that storage sees it too) for as long as it runs: its host, pid,
the process's start time and a heartbeat it renews every HEARTBEAT_S seconds. A second driver
(`--resume` typed while the first runs, here or on another machine) is refused with a line naming
the running one. A lock whose driver is gone does not block: on the same host, its pid is dead or
now belongs to another process (the start time differs); from another host, its heartbeat is older
than STALE_S seconds.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

from nas.config import ConfigError

from .storage import Storage

log = logging.getLogger(__name__)
LOCK_FILE = "driver.lock"
HEARTBEAT_S = 15.0
STALE_S = 90.0


def process_start(pid: int) -> str | None:
    """The start time of process `pid` in clock ticks since boot (/proc), or None if there is none."""
    try:
        stat = open(f"/proc/{pid}/stat").read()  # noqa: SIM115 (one read)
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


class DriverLock:
    def __init__(self, experiment_dir: Storage):
        self.file = experiment_dir / LOCK_FILE
        self.mine: dict | None = None
        self._made: Path | None = None  # the outermost folder the lock's write created (a filesystem)
        self._stop = threading.Event()
        self._beat: threading.Thread | None = None

    def holder(self) -> dict | None:
        """The lock's content, or None where there is none (or it cannot be read: a torn write)."""
        try:
            return json.loads(self.file.read_text()) if self.file.exists() else None
        except (OSError, ValueError):
            return None

    @staticmethod
    def alive(holder: dict) -> bool:
        if holder.get("host") == socket.gethostname():
            return process_start(int(holder.get("pid", -1))) == holder.get("start")
        return time.time() - float(holder.get("heartbeat", 0)) < STALE_S

    def acquire(self, field: str) -> None:
        """Takes the lock; refuses (a ConfigError on `field`) while another driver holds it."""
        holder = self.holder()
        if holder is not None and self.alive(holder):
            age = time.time() - float(holder.get("heartbeat", 0))
            raise ConfigError(
                field, str(self.file.uri.rsplit("/", 1)[0]),
                f"this sweep's driver is running: host {holder.get('host')}, pid {holder.get('pid')}, started "
                f"{holder.get('started')} (heartbeat {age:.0f} s ago); wait for it to end, or stop it "
                f"(kill {holder.get('pid')} on {holder.get('host')}) and then resume with --resume",
            )  # fmt: skip
        if holder is not None:
            log.warning(
                "the lock of a driver that is gone (host %s, pid %s, started %s) is taken over",
                holder.get("host"), holder.get("pid"), holder.get("started"),
            )  # fmt: skip
        pid = os.getpid()
        self.mine = {
            "host": socket.gethostname(), "pid": pid, "start": process_start(pid),
            "started": datetime.now(UTC).isoformat(timespec="seconds"), "heartbeat": time.time(),
        }  # fmt: skip
        folder = self.file.local_path.parent if self.file.local_path is not None else None
        while folder is not None and not folder.parent.exists():
            folder = folder.parent
        self._made = folder if folder is not None and not folder.exists() else None
        self.file.write_text(json.dumps(self.mine))
        self._beat = threading.Thread(target=self._heartbeat, name="driver-lock-heartbeat", daemon=True)
        self._beat.start()

    def _heartbeat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                self.file.write_text(json.dumps({**self.mine, "heartbeat": time.time()}))
            except Exception as err:  # the storage away for a moment: the next beat tries again
                log.warning("could not renew the driver lock %s (%s)", self.file.uri, err)

    def release(self) -> None:
        """Ends the heartbeat and removes the lock if it is still this driver's."""
        self._stop.set()
        if self.mine is None:
            return
        holder = self.holder()
        if holder is not None and holder.get("pid") == self.mine["pid"] and holder.get("host") == self.mine["host"]:
            try:
                self.file.delete()
            except Exception as err:
                log.warning("could not remove the driver lock %s (%s)", self.file.uri, err)
        self.mine = None
        # A driver refused before its sweep wrote anything leaves no empty folders behind.
        folder = self.file.local_path.parent if self.file.local_path is not None else None
        while self._made is not None and folder is not None and folder.is_dir() and not any(folder.iterdir()):
            folder.rmdir()
            if folder == self._made:
                break
            folder = folder.parent
