"""A throw-away PostgreSQL cluster on a loopback port, for tests, benchmarks and trying a team ledger.

Uses the server binaries of the system (``initdb``, ``pg_ctl``, ``postgres``: Debian's
``postgresql`` package, found through ``pg_config --bindir``, ``/usr/lib/postgresql/*/bin`` or
``PATH``). PostgreSQL refuses to run as root: as root the cluster runs as the ``postgres`` user
(``runuser -u postgres``) in a folder that user owns. Password authentication (SCRAM) is on,
so URLs carry a password as a real one would.

Example::

    with PostgresCluster() as cluster:
        url = cluster.create_database("ledger")   # postgresql://carbonoffset:...@127.0.0.1:PORT/ledger
"""

from __future__ import annotations

import glob
import os
import secrets
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType


def server_bindir() -> Path | None:
    """The folder holding ``initdb`` and ``pg_ctl``, or ``None`` when PostgreSQL is not installed."""
    candidates = []
    if shutil.which("pg_config"):
        out = subprocess.run(["pg_config", "--bindir"], capture_output=True, text=True, check=False).stdout
        candidates.append(out.strip())
    candidates += sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True)
    which = shutil.which("pg_ctl")
    if which:
        candidates.append(str(Path(which).resolve().parent))
    for folder in candidates:
        if folder and (Path(folder) / "initdb").exists() and (Path(folder) / "pg_ctl").exists():
            return Path(folder)
    return None


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class PostgresCluster:
    """Start (``start()`` or ``with``) and stop a private PostgreSQL cluster on ``127.0.0.1``.

    Attributes:
        port: the TCP port (free loopback port picked at start).
        user, password: the superuser to connect as.
        bindir: the server binaries used.

    Raises:
        RuntimeError: PostgreSQL is not installed (``apt-get install -y postgresql``) or did
            not start (the message has its log).
    """

    def __init__(self, *, user: str = "carbonoffset", password: str | None = None) -> None:
        bindir = server_bindir()
        if bindir is None:
            raise RuntimeError("PostgreSQL server binaries not found; install them: apt-get install -y postgresql")
        self.bindir = bindir
        self.user = user
        self.password = password or "pw-" + secrets.token_hex(8)
        self.port = 0
        self._root: Path | None = None
        self._running = False

    @property
    def data(self) -> Path:
        assert self._root is not None
        return self._root / "data"

    def _as_server_user(self, args: list[str]) -> list[str]:
        if os.geteuid() == 0:
            return ["runuser", "-u", "postgres", "--", *args]
        return args

    def _run(self, args: list[str], timeout: float = 60) -> None:
        result = subprocess.run(
            self._as_server_user(args), capture_output=True, text=True, timeout=timeout, check=False
        )
        if result.returncode != 0:
            log = ""
            if self._root is not None and (self._root / "log").exists():
                log = (self._root / "log").read_text(errors="replace")[-2000:]
            raise RuntimeError(f"{Path(args[0]).name} failed: {result.stderr.strip()} {log}".replace(self.password, "***"))

    def start(self) -> PostgresCluster:
        """Create the cluster (``initdb``) in a temporary folder and start it; returns ``self``."""
        self._root = Path(tempfile.mkdtemp(prefix="carbonoffset-pg-"))
        os.chmod(self._root, 0o755)  # noqa: S103 -- the server user must reach its data folder
        pwfile = self._root / "pwfile"
        pwfile.write_text(self.password + "\n")
        if os.geteuid() == 0:
            shutil.chown(self._root, "postgres", "postgres")
            shutil.chown(pwfile, "postgres", "postgres")
        os.chmod(pwfile, 0o600)
        self._run(
            [
                str(self.bindir / "initdb"),
                "-D", str(self.data),
                "-U", self.user,
                "--pwfile", str(pwfile),
                "--auth", "scram-sha-256",
                "--encoding", "UTF8",
                "--no-sync",
            ],
            timeout=120,
        )
        pwfile.unlink()
        self.restart()
        return self

    def restart(self) -> None:
        """Start the server (again, after :meth:`stop_server`) on the same port when it is free."""
        if not self.port:
            self.port = _free_port()
        assert self._root is not None, "start() first"
        root = self._root
        options = (
            # fsync off: fast, and a stopped server (not a lost OS) keeps every committed row
            f"-c listen_addresses=127.0.0.1 -p {self.port} -k {root} -c fsync=off "
            "-c full_page_writes=off -c max_connections=200"
        )
        self._run(
            [str(self.bindir / "pg_ctl"), "-D", str(self.data), "-l", str(root / "log"), "-o", options,
             "-w", "-t", "60", "start"],
            timeout=90,
        )
        self._running = True

    def stop_server(self) -> None:
        """Stop the server now (``immediate``: like a crash or a lost host); the data stays."""
        if self._running:
            self._run([str(self.bindir / "pg_ctl"), "-D", str(self.data), "-m", "immediate", "-w", "stop"])
            self._running = False

    def url(self, database: str = "postgres", *, driver: str = "postgresql") -> str:
        """``postgresql://user:password@127.0.0.1:port/database``."""
        return f"{driver}://{self.user}:{self.password}@127.0.0.1:{self.port}/{database}"

    def create_database(self, name: str) -> str:
        """Create an empty database and return its URL."""
        import psycopg

        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')  # name chosen by the caller (tests)
        return self.url(name)

    def close(self) -> None:
        """Stop the server and remove its folder (idempotent)."""
        try:
            if self._running:
                self._run([str(self.bindir / "pg_ctl"), "-D", str(self.data), "-m", "fast", "-w", "stop"])
                self._running = False
        finally:
            if self._root is not None:
                shutil.rmtree(self._root, ignore_errors=True)
                self._root = None

    def __enter__(self) -> PostgresCluster:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"PostgresCluster(port={self.port}, user={self.user!r})"


def wait_until_accepting(url: str, timeout: float = 30.0) -> None:
    """Wait until the server at ``url`` accepts connections (after :meth:`PostgresCluster.restart`)."""
    import psycopg

    deadline = time.monotonic() + timeout
    while True:
        try:
            with psycopg.connect(url, connect_timeout=2):
                return
        except psycopg.OperationalError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)
