"""A real PostgreSQL 15 cluster started by pg_llm itself: initdb in a directory, a free port, the socket in
the cluster directory, test-speed settings (or durable ones: the dev cluster), pg_llm's numpy on the
postmaster's PYTHONPATH.

initdb refuses to run as root, so when euid is 0 every server command runs as the `postgres` user through
`runuser -u postgres --`, and the directories it needs are made traversable/owned for that user."""
from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import psycopg

PG_BIN = Path(os.environ.get("PG_LLM_PG_BIN", "/usr/lib/postgresql/15/bin"))
ROOT = Path(__file__).resolve().parent.parent.parent
SERVER_PYTHON_DEFAULT = Path("/usr/local/lib/pg_llm/python3")


def shared_buffers_mb(total_mb: int | None = None) -> int:
    """PostgreSQL's guidance, a quarter of the machine's memory, within [512 MB, 8 GB]. Why it matters here: a
    training step rewrites every parameter and moment tile (1.5 GB at GPT-2 small), and with their old versions
    they must fit, or the backend writes out evicted dirty pages itself; GPT-2 small 1 x 128 steps measured
    (2026-12-03) 9.9-16 s with 512 MB and 5.8-7.0 s with 4 GB."""
    if total_mb is None:
        total_mb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 1048576
    return max(512, min(8192, total_mb // 4))


def wal_buffers_mb(total_mb: int | None = None) -> int:
    """A sixteenth of shared_buffers_mb, within [16 MB, 256 MB] (PostgreSQL's automatic choice stops at 16 MB)."""
    return max(16, min(256, shared_buffers_mb(total_mb) // 16))


FAST_SETTINGS = {
    "fsync": "off",
    "synchronous_commit": "off",
    "full_page_writes": "off",
    "shared_buffers": f"{shared_buffers_mb()}MB",
    "work_mem": "64MB",
    "maintenance_work_mem": "256MB",
    "max_connections": "40",
    "max_prepared_transactions": "10",  # two-phase commit: a training step that commits on every rank or none
    "max_wal_size": "4GB",
    # A GPT-2 small step writes ~1.5 GB of WAL. Keep every segment for reuse (else segments removed after a
    # checkpoint are created and zero-filled again: steps of 14-21 s instead of 7-8 at 1 x 128), and let the WAL
    # writer, on the other core, write the WAL buffers out instead of the stepping backend. Measured 2026-12-03
    # (GPT-2 small 1 x 128, 8 steps each): mean 10.3 s by default, 8.1 s with the first two, 7.5 s with all four.
    "min_wal_size": "4GB",
    "wal_init_zero": "off",
    "wal_buffers": f"{wal_buffers_mb()}MB",
    "wal_writer_delay": "10ms",
    "logging_collector": "off",
    "log_min_messages": "warning",
}


# What the fast settings give up: a committed transaction may be lost, or the cluster corrupted, by an OS crash
# or power loss. The dev cluster people train in (pg-llm db start) keeps PostgreSQL's durable defaults.
NOT_DURABLE = ("fsync", "synchronous_commit", "full_page_writes")
DURABLE = {k: "on" for k in NOT_DURABLE}

REQUIRED_EXTENSIONS = ("plpython3u", "dblink")  # pg_llm.control: requires = 'plpython3u, dblink'


class ClusterError(RuntimeError):
    pass


def server_python_path() -> str:
    """Where `make setup` installed numpy for plpython3u (see scripts/setup.sh)."""
    env = os.environ.get("PG_LLM_SERVER_PYTHON")
    if env:
        return env
    marker = ROOT / ".pg_llm" / "server-python-path"
    if marker.exists():
        return marker.read_text().strip()
    return str(SERVER_PYTHON_DEFAULT)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _as_root() -> bool:
    return os.geteuid() == 0


def _server_user() -> str:
    return "postgres" if _as_root() else pwd.getpwuid(os.geteuid()).pw_name


def _run(cmd: list[str], env: dict[str, str] | None = None, check: bool = True) -> subprocess.CompletedProcess:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    full_env.update(env or {})
    if _as_root():
        envargs = [f"{k}={v}" for k, v in (env or {}).items()]
        cmd = ["runuser", "-u", "postgres", "--", "env", *envargs, *cmd]
    p = subprocess.run(cmd, env=full_env, capture_output=True, text=True)
    if check and p.returncode != 0:
        raise ClusterError(f"{' '.join(cmd)} failed ({p.returncode}):\n{p.stdout}\n{p.stderr}")
    return p


def _make_accessible(path: Path) -> None:
    """As root: the server user must traverse every parent of the cluster directory."""
    if not _as_root():
        return
    for parent in reversed(path.parents):
        st = parent.stat()
        if not st.st_mode & 0o001:
            os.chmod(parent, st.st_mode | 0o011)


@dataclass
class Cluster:
    datadir: Path
    port: int
    user: str = field(default_factory=_server_user)
    ephemeral: bool = True
    durable: bool = False  # PostgreSQL's crash safety (fsync, full_page_writes, synchronous_commit on)

    @property
    def socket_dir(self) -> Path:
        return self.datadir / "socket"

    def dsn(self, dbname: str = "postgres") -> str:
        return f"host=127.0.0.1 port={self.port} user={self.user} dbname={dbname}"

    def url(self, dbname: str = "postgres") -> str:
        return f"postgresql://{self.user}@127.0.0.1:{self.port}/{dbname}"

    # -- lifecycle -------------------------------------------------------------------------------
    def initdb(self) -> None:
        self.datadir.mkdir(parents=True, exist_ok=True)
        _make_accessible(self.datadir)
        if _as_root():
            shutil.chown(self.datadir, "postgres", "postgres")
        os.chmod(self.datadir, 0o700)
        _run([str(PG_BIN / "initdb"), "-D", str(self.datadir), "-U", self.user, "--auth=trust",
              "-E", "UTF8", "--locale=C.UTF-8", *([] if self.durable else ["--no-sync"])])
        settings = {**FAST_SETTINGS, **DURABLE} if self.durable else FAST_SETTINGS
        conf = "\n".join(f"{k} = '{v}'" for k, v in settings.items())
        with open(self.datadir / "postgresql.auto.conf", "a") as f:
            f.write(f"\n# pg_llm harness\n{conf}\nlisten_addresses = '127.0.0.1'\n"
                    f"unix_socket_directories = '{self.socket_dir}'\n")
        if _as_root():
            shutil.chown(self.datadir / "postgresql.auto.conf", "postgres", "postgres")

    def start(self, wait: float = 30.0) -> None:
        if not self.socket_dir.exists():
            self.socket_dir.mkdir()
            if _as_root():
                shutil.chown(self.socket_dir, "postgres", "postgres")
        env = {"PYTHONPATH": server_python_path(), "PG_LLM_SERVER_PYTHON": server_python_path()}
        if "PG_LLM_BLAS_THREADS" in os.environ:
            env["OPENBLAS_NUM_THREADS"] = os.environ["PG_LLM_BLAS_THREADS"]
        for k in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE"):
            if k in os.environ:
                env[k] = os.environ[k]
        _run([str(PG_BIN / "pg_ctl"), "-D", str(self.datadir), "-o", f"-p {self.port}",
              "-l", str(self.datadir / "server.log"), "-w", "-t", str(int(wait)), "start"], env=env)
        self.wait_ready(wait)

    def make_durable(self) -> list[str]:
        """Turn the durability settings on in a running cluster (one made with the fast ones, say); returns the
        names it changed (all three reload without a restart)."""
        with psycopg.connect(self.dsn(), autocommit=True) as conn:
            off = [n for n, v in conn.execute("SELECT name, setting FROM pg_settings WHERE name = ANY(%s)",
                                              (list(NOT_DURABLE),)).fetchall() if v != "on"]
            for name in off:
                conn.execute(f"ALTER SYSTEM SET {name} = on")
            if off:
                conn.execute("SELECT pg_reload_conf()")
        return off

    def wait_ready(self, wait: float = 30.0) -> None:
        deadline = time.time() + wait
        while True:
            try:
                with psycopg.connect(self.dsn(), connect_timeout=2):
                    return
            except psycopg.OperationalError:
                if time.time() > deadline:
                    raise ClusterError(f"server did not accept connections; log:\n{self.log_tail()}") from None
                time.sleep(0.1)

    def stop(self, mode: str = "fast") -> None:
        _run([str(PG_BIN / "pg_ctl"), "-D", str(self.datadir), "-m", mode, "-w", "stop"], check=False)

    def is_running(self) -> bool:
        return _run([str(PG_BIN / "pg_ctl"), "-D", str(self.datadir), "status"], check=False).returncode == 0

    def destroy(self) -> None:
        self.stop("immediate")
        shutil.rmtree(self.datadir.parent if self.ephemeral else self.datadir, ignore_errors=True)

    def log_tail(self, n: int = 40) -> str:
        try:
            return "\n".join((self.datadir / "server.log").read_text().splitlines()[-n:])
        except OSError:
            return "(no server log)"

    # -- databases -------------------------------------------------------------------------------
    def prepare_template(self) -> None:
        """pg_llm's prerequisites in template1, so every new database can run a plain CREATE EXTENSION pg_llm
        (the playbook's statement) without CASCADE."""
        with psycopg.connect(self.dsn("template1"), autocommit=True) as conn:
            for ext in REQUIRED_EXTENSIONS:
                conn.execute(f"CREATE EXTENSION IF NOT EXISTS {ext}")

    def create_database(self, name: str, install: bool = True) -> str:
        with psycopg.connect(self.dsn(), autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            conn.execute(f'CREATE DATABASE "{name}"')
        if install:
            install_pg_llm(self.dsn(name))
        return self.dsn(name)


def install_pg_llm(dsn: str, script: Path | None = None) -> None:
    """Run install.sql (what `psql -f install.sql` runs) in one transaction."""
    path = script or ROOT / "install.sql"
    if not path.exists():
        raise ClusterError(f"pg_llm: {path} is missing: it is built, not committed; run `make generate`")
    text = path.read_text()
    with psycopg.connect(dsn) as conn:
        conn.execute(text)  # no parameters: psycopg sends it as one simple-protocol query


def start_ephemeral(prefix: str = "pg_llm_test_", durable: bool = False) -> Cluster:
    """initdb + start a throwaway cluster in a temp dir (fast, not crash-safe settings unless durable); call
    destroy() at the end."""
    base = Path(tempfile.mkdtemp(prefix=prefix))
    os.chmod(base, 0o755)
    cluster = Cluster(datadir=base / "data", port=free_port(), durable=durable)
    cluster.initdb()
    cluster.start()
    cluster.prepare_template()
    return cluster
