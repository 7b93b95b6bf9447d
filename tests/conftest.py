"""Shared fixtures: the real CLI in a subprocess, a home folder, a pipeline that logs its calls."""

from __future__ import annotations

import fcntl
import importlib.util
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
from pathlib import Path
from typing import Callable

import pytest

ROOT = Path(__file__).resolve().parent.parent

# The commands under test meet Ctrl-C as at a terminal, however the suite was started: a
# background job of a shell (`pytest ... &`, nohup, some CI runners) starts with SIGINT ignored,
# pytest-xdist's workers inherit that and so would every CLI they start (which then could not
# be interrupted before its run exists). A handler here becomes SIG_DFL in a child at exec.
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN and threading.current_thread() is threading.main_thread():
    signal.signal(signal.SIGINT, signal.default_int_handler)

FAKE_SERVER_SCRIPT = ROOT / "scripts" / "fake_llm_server.py"


def fake_server_module():
    """scripts/fake_llm_server.py as a module (it is a script, not part of the package)."""
    if "fake_llm_server" not in sys.modules:
        spec = importlib.util.spec_from_file_location("fake_llm_server", FAKE_SERVER_SCRIPT)
        module = importlib.util.module_from_spec(spec)
        sys.modules["fake_llm_server"] = module
        spec.loader.exec_module(module)
    return sys.modules["fake_llm_server"]


@pytest.fixture
def fake_server():
    """``start(**options) -> url``: the fake server on a background thread of this process
    (the pipeline runs in a CLI subprocess); every server is stopped at the end."""
    stops = []

    def start(**options) -> str:
        url, stop = fake_server_module().start_server(latency_ms=options.pop("latency_ms", 10), **options)
        stops.append(stop)
        return url

    yield start
    for stop in stops:
        stop()


class ServerProcess:
    """The fake server in its own process (its own GIL), for runs inside this process."""

    def __init__(self, *flags: str) -> None:
        self.proc = subprocess.Popen([sys.executable, str(FAKE_SERVER_SCRIPT), "--port", "0", *flags],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        line = self.proc.stdout.readline().strip()
        if not line.startswith("listening on "):
            self.stop()
            raise AssertionError(f"the fake server did not start: {line!r}")
        self.url = line.removeprefix("listening on ")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.communicate()


POSTGRES_URL = os.environ.get("PIPELINE_TEST_POSTGRES_URL")


@pytest.fixture
def postgres_url():
    """A PostgreSQL URL on a fresh schema of this test's own (dropped afterwards), migrated to
    the newest revision as `pipeline db upgrade` does (opening a PostgreSQL store never
    upgrades one at an older revision): tests never share tables, so runs of different versions
    on one server cannot meet (skipped without PIPELINE_TEST_POSTGRES_URL)."""
    from pipeline.store import migrate
    from tests.conftest_store import postgres_schema_url

    with postgres_schema_url() as url:
        migrate.upgrade(url)
        yield url


@pytest.fixture
def postgres_empty_url():
    """Like ``postgres_url``, on a schema with no tables at all."""
    from tests.conftest_store import postgres_schema_url

    with postgres_schema_url() as url:
        yield url


def cli_env(**extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIPELINE_")}
    env["PYTHONPATH"] = str(ROOT)
    env.update(extra)
    return env


def cli(*args: str, home: Path | None = None, db: str | None = None, check: bool = False, timeout: float = 120,
        env: dict | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """Run `pipeline ARGS` (the real command line) and wait for it."""
    cmd = [sys.executable, "-m", "pipeline.cli", *args]
    if home is not None:
        cmd += ["--home", str(home)]
    if db is not None:
        cmd += ["--db", db]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env or cli_env(), cwd=cwd)
    if check and proc.returncode != 0:
        raise AssertionError(f"{args} exited {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}")
    return proc


def cli_popen(*args: str, home: Path | None = None, db: str | None = None, env: dict | None = None,
              **kw) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "pipeline.cli", *args]
    if home is not None:
        cmd += ["--home", str(home)]
    if db is not None:
        cmd += ["--db", db]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env or cli_env(), **kw)


LOGGED_FNS = '''
import asyncio, os

def _log(col, key):
    fd = os.open(os.environ["PIPELINE_TEST_CALLS"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, f"{col},{key}\\n".encode())
    finally:
        os.close(fd)


async def upper(row):
    await asyncio.sleep(float(os.environ.get("PIPELINE_TEST_SLEEP", "0.004")))
    _log("up", row["id"])
    return row["word"].upper() + "-" + row["id"][:4]


async def length(row):
    await asyncio.sleep(float(os.environ.get("PIPELINE_TEST_SLEEP", "0.004")))
    _log("len", row["id"])
    return len(row["up"]) + row["n"]


def both(row):
    _log("both", row["id"])
    return {"left": row["n"] * 2, "right": str(row["n"])}


def total(df):
    _log("total", df.index[0])
    return (df["len"] + df["left"]).tolist()
'''


def logged_pipeline(folder: Path, *, records: int = 300, rg: int = 50, in_flight: int = 32,
                    extra_settings: str = "") -> Path:
    """A deterministic pipeline whose python columns log every call to $PIPELINE_TEST_CALLS."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "logged_fns.py").write_text(LOGGED_FNS)
    (folder / "cfg.yaml").write_text(textwrap.dedent(f"""\
        name: logged
        num_records: {records}
        row_group_size: {rg}
        seed: 11
        settings: {{max_in_flight_tasks: {in_flight}, max_concurrent_row_groups: 3{extra_settings}}}
        columns:
          - {{name: id, type: sampler, sampler: uuid}}
          - {{name: n, type: sampler, sampler: integer, params: {{low: 0, high: 100}}}}
          - {{name: word, type: sampler, sampler: category, params: {{values: [ant, bee, cat, dog]}}}}
          - {{name: up, type: python, function: "logged_fns:upper", requires: [word, id]}}
          - {{name: len, type: python, function: "logged_fns:length", requires: [up, n, id]}}
          - {{name: pair, type: python, function: "logged_fns:both", requires: [n, id], outputs: [left, right]}}
          - {{name: total, type: python, function: "logged_fns:total", mode: batch, requires: [len, left]}}
          - {{name: label, type: expression, expr: "{{{{ word }}}}:{{{{ total }}}}"}}
        """))
    return folder / "cfg.yaml"


def built_once(tmp_path_factory, name: str, build: Callable[[Path], None]) -> Path:
    """The folder ``build(folder)`` fills, built once per test session: under pytest-xdist the
    first worker to ask builds it while the others wait on a lock, then every worker reads it.
    For a module fixture that costs seconds of CPU (the runs a module's tests read); its tests
    must only read the folder."""
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # this session's folder, shared by its workers
    folder = root / f"built-{name}"
    with open(root / f"built-{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file is closed
        if not (folder / ".built").exists():  # nobody built it yet, or a build failed
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir()
            build(folder)
            (folder / ".built").touch()
    return folder


@pytest.fixture
def home(tmp_path: Path) -> Path:
    return tmp_path / "home"


def read_calls(path: Path) -> list[tuple[str, str]]:
    if not path.exists():
        return []
    return [tuple(line.split(",", 1)) for line in path.read_text().splitlines() if line]


# -- stores ---------------------------------------------------------------------------------------

STORE_BACKENDS = ["memory", "sqlite", "postgresql"]


@pytest.fixture(scope="session")
def postgres_session_url():
    """One PostgreSQL schema, migrated once, shared by the tests of a session (they use unique
    run ids; skipped without PIPELINE_TEST_POSTGRES_URL)."""
    from pipeline.store import migrate
    from tests.conftest_store import postgres_schema_url

    with postgres_schema_url() as url:
        migrate.upgrade(url)
        yield url


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request, tmp_path) -> str:
    """The URL of a migrated state store: a SQLite file in tmp_path, or PostgreSQL."""
    from tests.conftest_store import sqlite_url

    if request.param == "sqlite":
        return sqlite_url(tmp_path)
    return request.getfixturevalue("postgres_session_url")


@pytest.fixture(params=["sqlite", "postgresql"])
def empty_db_url(request, tmp_path):
    """The URL of an empty database: a new SQLite file, or a new PostgreSQL schema."""
    from tests.conftest_store import empty_database_url

    with empty_database_url(request.param, tmp_path) as url:
        yield url


@pytest.fixture(params=STORE_BACKENDS)
def store_factory(request, tmp_path):
    """``open(owner=None) -> Store``: a new store (a worker of its own owner id, or ``owner``) on
    one database of this test: in memory, a SQLite file in tmp_path, or PostgreSQL (a schema of
    this session; runs have unique ids). Every store opened is closed at the end."""
    from pipeline.store import open_store
    from pipeline.store.memory import MemoryStore
    from tests.conftest_store import sqlite_url

    opened = []
    if request.param == "memory":
        # MemoryStore instances act as workers of one store by sharing this dict (its constructor's
        # ``data``); there is no public factory for it yet.
        data: dict = {"runs": {}, "lock": threading.RLock()}

        def open_one(owner=None):
            opened.append(MemoryStore(data, owner=owner))
            return opened[-1]
    else:
        url = sqlite_url(tmp_path) if request.param == "sqlite" else request.getfixturevalue("postgres_session_url")

        def open_one(owner=None):
            opened.append(open_store(url, owner=owner))
            return opened[-1]

    yield open_one
    for store in opened:
        store.close()


@pytest.fixture
def stores(store_factory):
    """Two workers (two owner ids) on one store: in memory, SQLite or PostgreSQL."""
    return store_factory(), store_factory()


@pytest.fixture
def any_store(store_factory):
    """A store: in memory, SQLite or PostgreSQL."""
    return store_factory()


# -- the LLM client (tests/test_llm_client_*.py, tests/test_llm_generators.py) ---------------------


@pytest.fixture(scope="module")
def server_url():
    """The fake server, one per test module (answers holding SPOIL are malformed)."""
    url, stop = fake_server_module().start_server(latency_ms=5, malformed_marker="SPOIL")
    yield url
    stop()


@pytest.fixture(scope="module")
def keyed_url():
    """The fake server, refusing any request without tests.llm_helpers.SECRET as its key."""
    from tests.llm_helpers import SECRET

    url, stop = fake_server_module().start_server(require_key=SECRET)
    yield url
    stop()


@pytest.fixture
async def client():
    """An LlmClient, closed at the end."""
    from pipeline.llm import LlmClient

    client = LlmClient(max_connections=16)
    yield client
    await client.aclose()


@pytest.fixture
def secret_env(monkeypatch):
    """The key variable (tests.llm_helpers.KEY_ENV) set to the key keyed_url wants."""
    from tests.llm_helpers import KEY_ENV, SECRET

    monkeypatch.setenv(KEY_ENV, SECRET)


@pytest.fixture
async def generator_of():
    """``generator_of(column, config)``: the column's generator on a runtime of its own (as a
    run's job owns one), closed at the end."""
    from pipeline.generators.llm import make_llm_generator
    from pipeline.llm import LlmRuntime

    owned = []

    def make(column, config):
        owned.append(LlmRuntime(config.models))
        return make_llm_generator(column, config, runtime=owned[-1])

    yield make
    for runtime in owned:
        await runtime.aclose()


@pytest.fixture(scope="module")
def raw_server():
    """A server that answers every request with RAW_ANSWERS[<the request's last word>]
    (tests.llm_helpers), then closes the connection: answers the fake server cannot give."""
    import socketserver

    from tests.llm_helpers import RAW_ANSWERS

    class Handler(socketserver.BaseRequestHandler):
        def handle(self):
            data = b""
            while b"\r\n\r\n" not in data:
                chunk = self.request.recv(65536)
                if not chunk:
                    return
                data += chunk
            head, _, body = data.partition(b"\r\n\r\n")
            length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                          if line.lower().startswith(b"content-length"))
            while len(body) < length:
                body += self.request.recv(65536)
            import json

            word = json.loads(body)["messages"][-1]["content"].split("|")[-1]
            self.request.sendall(RAW_ANSWERS[word])

    server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    server.shutdown()
    server.server_close()
