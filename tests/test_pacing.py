"""Pacing, provider options and cost (issue 10 items 5-7; CONTRACT section 10, "Headers").

End to end: the real command line in a subprocess, a real SQLite file, the fake server on
127.0.0.1 enforcing per-minute limits (scripts/fake_llm_limits.py) and recording what reached
it (``GET /last``). The pacing logic itself is also held with a fake clock (no timing).
"""

from __future__ import annotations

import json
import textwrap
import urllib.request
import uuid
from pathlib import Path

import pytest

from tests.conftest import cli, cli_env

# -- helpers --------------------------------------------------------------------------------


def server_get(url: str, path: str) -> dict:
    with urllib.request.urlopen(url.removesuffix("/v1") + path, timeout=10) as response:
        return json.loads(response.read())


def write_config(folder: Path, url: str, *, records: int = 40, model_extra: str = "", max_tokens: int = 30,
                 parallel: int = 16) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "cfg.yaml"
    model = textwrap.indent(model_extra, "    ")
    path.write_text(
        "name: paced\n"
        f"num_records: {records}\n"
        "row_group_size: 50\n"
        "settings: {retry_backoff_s: 0.05, salvage_max_rounds: 30}\n"
        "models:\n"
        "  w:\n"
        f"    base_url: {url}\n"
        "    model: m\n"
        f"    max_parallel_requests: {parallel}\n"
        f"{model}"
        "columns:\n"
        "  - {name: n, type: sampler, sampler: integer, params: {low: 1, high: 1000000000}}\n"
        f"  - {{name: t, type: llm_text, model: w, max_tokens: {max_tokens}, prompt: 'Say {{{{ n }}}} now'}}\n")
    return path


def run_ok(*args: str, home: Path, env: dict | None = None):
    proc = cli(*args, home=home, env=env, timeout=300)
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    return proc


def status_json(run_id: str, home: Path, env: dict | None = None) -> dict:
    return json.loads(run_ok("status", run_id, "--json", home=home, env=env).stdout)


# -- 5: pacing, end to end ------------------------------------------------------------------


@pytest.mark.slow
def test_a_run_paced_by_the_servers_headers_is_rarely_refused(tmp_path, fake_server):
    # 1,200 requests/min (20/s), 1 s of budget at the start; 120 requests: without pacing,
    # 16 permits at 10 ms get most of them refused (the second run shows it).
    url = fake_server(latency_ms=10, rpm_limit=1200, limits_start_s=1)
    home = tmp_path / "home"
    run_ok("run", str(write_config(tmp_path / "a", url, records=120)), "--run-id", "paced", home=home)
    served = server_get(url, "/stats")["models"]["m"]
    assert served["requests"] - served["rate_limited"] == 120
    assert served["rate_limited"] <= 3, served  # <= 2.5 %: the first answer brings the headers

    s = status_json("paced", home)
    m = s["models"]["w"]
    assert m["rate_limit_headers"]["x-ratelimit-limit-requests"] == "1200"
    assert set(m["rate_limit_headers"]) == {"x-ratelimit-limit-requests", "x-ratelimit-remaining-requests",
                                            "x-ratelimit-reset-requests"}
    assert m["concurrency"] >= 1 and m["requests_per_minute"] > 0 and m["tokens_per_minute"] > 0
    text = run_ok("status", "paced", home=home).stdout
    assert "last rate-limit headers: limit-requests=1200" in text, text


@pytest.mark.slow
def test_without_headers_or_budgets_the_same_run_meets_many_429s(tmp_path, fake_server):
    """The control of the test above: the same server without its headers refuses a lot."""
    url = fake_server(latency_ms=10, rpm_limit=1200, limits_start_s=1, limit_headers=False)
    run_ok("run", str(write_config(tmp_path / "a", url, records=120)), home=tmp_path / "home")
    assert server_get(url, "/stats")["models"]["m"]["rate_limited"] > 20


@pytest.mark.slow
def test_per_minute_budgets_pace_a_run_against_a_server_that_sends_no_headers(tmp_path, fake_server):
    url = fake_server(latency_ms=10, rpm_limit=1200, tpm_limit=30000, limits_start_s=1, limit_headers=False)
    home = tmp_path / "home"
    extra = "max_requests_per_minute: 1200\nmax_tokens_per_minute: 30000\n"
    run_ok("run", str(write_config(tmp_path / "a", url, records=120, model_extra=extra)), "--run-id", "b",
           home=home)
    served = server_get(url, "/stats")["models"]["m"]
    assert served["requests"] - served["rate_limited"] == 120
    assert served["rate_limited"] <= 3, served
    m = status_json("b", home)["models"]["w"]
    assert (m["max_requests_per_minute"], m["max_tokens_per_minute"]) == (1200, 30000)
    assert m["rate_limit_headers"] == {}
    assert "paced to 1,200 requests/min, 30,000 tokens/min" in run_ok("status", "b", home=home).stdout


@pytest.mark.slow
def test_a_tokens_per_minute_budget_reserves_max_tokens_until_the_usage_is_known(tmp_path, fake_server):
    # The server allows 3,000 tokens/min (50/s; ~12 tokens an answer). Each request reserves
    # its max_tokens (30) and is corrected to what it used: paced by tokens, hardly refused.
    url = fake_server(latency_ms=10, tpm_limit=3000, limits_start_s=1, limit_headers=False)
    home = tmp_path / "home"
    run_ok("run", str(write_config(tmp_path / "a", url, records=30, model_extra="max_tokens_per_minute: 3000\n")),
           "--run-id", "tok", home=home)
    served = server_get(url, "/stats")["models"]["m"]
    assert served["requests"] - served["rate_limited"] == 30
    assert served["rate_limited"] <= 2, served


# -- 6: provider options --------------------------------------------------------------------


@pytest.mark.slow
def test_extra_headers_api_key_header_and_extra_body_reach_the_server_and_never_leak(tmp_path, fake_server):
    key = f"azure-key-{uuid.uuid4().hex}"
    token = f"gateway-token-{uuid.uuid4().hex}"
    url = fake_server(latency_ms=5)
    extra = textwrap.dedent("""\
        api_key_env: PIPELINE_TEST_AZURE_KEY
        api_key_header: api-key
        extra_headers:
          X-Team: data-gen
          X-Gateway-Token: {env: PIPELINE_TEST_GATEWAY_TOKEN}
        extra_body:
          top_p: 0.5
          chat_template_kwargs: {enable_thinking: false}
        """)
    cfg = write_config(tmp_path / "a", url, records=20, model_extra=extra)
    env = cli_env(PIPELINE_TEST_AZURE_KEY=key, PIPELINE_TEST_GATEWAY_TOKEN=token)
    home = tmp_path / "home"
    proc = run_ok("run", str(cfg), "--run-id", "opts", home=home, env=env)

    last = server_get(url, "/last")
    for kind in ("run", "preflight", "list_models"):  # the model check sends the same headers
        headers = last[kind]["headers"]
        assert headers["api-key"] == key, kind
        assert "authorization" not in headers, kind
        assert headers["x-team"] == "data-gen" and headers["x-gateway-token"] == token, kind
    for kind in ("run", "preflight"):
        body = last[kind]["body"]
        assert body["top_p"] == 0.5 and body["chat_template_kwargs"] == {"enable_thinking": False}, kind
        assert body["model"] == "m"

    outputs = [proc.stdout, proc.stderr]
    for args in (("status", "opts"), ("status", "opts", "--json"), ("runs",),
                 ("sql", "SELECT config FROM runs"), ("sql", "SELECT * FROM model_usage")):
        done = run_ok(*args, home=home, env=env)
        outputs += [done.stdout, done.stderr]
    stored = run_ok("sql", "SELECT config FROM runs", "--json", home=home, env=env).stdout
    assert "PIPELINE_TEST_GATEWAY_TOKEN" in stored  # the NAME is stored, never the value
    for secret in (key, token):
        assert not any(secret in text for text in outputs)
        for path in home.rglob("*"):
            if path.is_file():
                assert secret.encode() not in path.read_bytes(), path


def test_an_unset_header_variable_is_refused_before_anything_is_created(tmp_path, fake_server):
    url = fake_server(latency_ms=5)
    extra = "extra_headers: {X-Token: {env: PIPELINE_TEST_UNSET_VARIABLE}}\n"
    proc = cli("run", str(write_config(tmp_path / "a", url, model_extra=extra)), home=tmp_path / "home")
    assert proc.returncode == 2, proc.stderr
    assert "PIPELINE_TEST_UNSET_VARIABLE" in proc.stderr and "not set" in proc.stderr
    assert not (tmp_path / "home" / "runs").exists()


@pytest.mark.parametrize("variable", ["PIPELINE_TEST_GATEWAY_TOKEN", "PIPELINE_TEST_AZURE_KEY"])
def test_a_key_or_header_variable_with_a_line_break_is_named_without_its_value(tmp_path, fake_server, variable):
    """A key saved with Windows line endings ends in \\r, which aiohttp refuses to send: the
    message names the variable (never the value), and no request leaves."""
    url = fake_server(latency_ms=5)
    extra = ("api_key_env: PIPELINE_TEST_AZURE_KEY\n"
             "extra_headers: {X-Gateway-Token: {env: PIPELINE_TEST_GATEWAY_TOKEN}}\n")
    env = cli_env(PIPELINE_TEST_AZURE_KEY="azure-secret-value", PIPELINE_TEST_GATEWAY_TOKEN="gateway-secret-value")
    env[variable] = env[variable] + "\r"
    proc = cli("run", str(write_config(tmp_path / "a", url, model_extra=extra)), home=tmp_path / "home", env=env)
    assert proc.returncode == 2, proc.stderr
    assert variable in proc.stderr and "line break" in proc.stderr, proc.stderr
    assert "secret-value" not in proc.stderr + proc.stdout
    assert not (tmp_path / "home" / "runs").exists()


def test_extra_body_is_part_of_a_columns_fingerprint_and_headers_are_not(tmp_path):
    from pipeline.config import load_config
    from pipeline.fingerprints import fingerprints

    def digests(extra: str) -> dict:
        cfg = load_config(write_config(tmp_path / uuid.uuid4().hex, "http://127.0.0.1:9/v1", model_extra=extra))
        return fingerprints(cfg)

    plain = digests("")
    assert digests("extra_headers: {X-Team: a}\napi_key_env: HOME\napi_key_header: api-key\n") == plain
    assert digests("max_requests_per_minute: 10\nprice_per_million_input_tokens: 1.0\n") == plain
    changed = digests("extra_body: {top_p: 0.5}\n")
    assert changed[("column", "t")] != plain[("column", "t")]
    assert changed[("column", "n")] == plain[("column", "n")]


# -- 7: cost --------------------------------------------------------------------------------


@pytest.mark.slow
def test_cost_appears_in_status_json_and_the_summary_with_the_right_arithmetic(tmp_path, fake_server):
    url = fake_server(latency_ms=5)
    home = tmp_path / "home"
    extra = "price_per_million_input_tokens: 2.5\nprice_per_million_output_tokens: 10\n"
    proc = run_ok("run", str(write_config(tmp_path / "a", url, records=30, model_extra=extra)), "--run-id", "c",
                  home=home)
    s = status_json("c", home)
    m = s["models"]["w"]
    expected = (m["prompt_tokens"] * 2.5 + m["completion_tokens"] * 10) / 1e6
    assert m["prompt_tokens"] > 0 and m["completion_tokens"] > 0
    assert m["cost"] == pytest.approx(expected, rel=1e-9)
    assert m["projected_cost"] == pytest.approx(expected, rel=1e-9)  # complete: what it spent
    assert s["cost"]["spent"] == pytest.approx(expected, rel=1e-9)
    assert s["cost"]["projected"] == pytest.approx(expected, rel=1e-9)
    assert f"cost {expected:,.4f}" in proc.stderr and f"cost: {expected:,.4f} spent" in proc.stderr
    assert f"cost: {expected:,.4f} spent, {expected:,.4f} projected" in run_ok("status", "c", home=home).stdout
    rows = json.loads(run_ok("sql", "SELECT model, cost FROM model_usage", "--json", home=home).stdout)
    assert rows == [{"model": "w", "cost": pytest.approx(expected, rel=1e-9)}]


@pytest.mark.slow
def test_a_run_without_prices_shows_no_cost(tmp_path, fake_server):
    url = fake_server(latency_ms=5)
    home = tmp_path / "home"
    proc = run_ok("run", str(write_config(tmp_path / "a", url, records=5)), "--run-id", "free", home=home)
    s = status_json("free", home)
    assert s["cost"] is None and s["models"]["w"]["cost"] is None
    assert "cost" not in proc.stderr


def test_the_projected_cost_scales_the_spent_cost_by_the_cells_still_to_compute():
    from pipeline.costs import add_costs

    config = json.dumps({"columns": [{"name": "a", "type": "llm_text", "model": "w"},
                                     {"name": "b", "type": "llm_judge", "model": "w"},
                                     {"name": "c", "type": "llm_text", "model": "free"}]})
    status = {"status": "running", "num_records": 100,
              "columns": {"a": {"done": 40, "failed": 0}, "b": {"done": 9, "failed": 1}, "c": {"done": 5, "failed": 0}},
              "models": {"w": {"cost": 0.5}, "free": {"cost": None}}}
    add_costs(status, config)
    assert status["models"]["w"]["projected_cost"] == pytest.approx(0.5 * 200 / 50)
    assert status["models"]["free"]["projected_cost"] is None
    assert status["cost"] == {"spent": 0.5, "projected": pytest.approx(2.0)}


# -- config errors --------------------------------------------------------------------------


@pytest.mark.parametrize("extra, words", [
    ("max_requests_per_minute: 0\n", "max_requests_per_minute"),
    ("max_requests_per_minute: 1.0e-300\n", "max_requests_per_minute"),
    ("max_tokens_per_minute: -5\n", "max_tokens_per_minute"),
    ("max_tokens_per_minute: '100'\n", "max_tokens_per_minute"),
    ("price_per_million_input_tokens: -1\n", "price_per_million_input_tokens"),
    ("price_per_million_output_tokens: cheap\n", "price_per_million_output_tokens"),
    ("api_key_header: api-key\n", "set api_key_env too"),
    ("api_key_env: HOME\napi_key_header: 'bad header'\n", "api_key_header"),
    ("extra_body: {model: other}\n", "extra_body may not set model"),
    ("extra_headers: {Authorization: Bearer-x}\n", "may not set 'Authorization'"),
    ("extra_headers: {X-Key: sk-abcdefghijklmnopqrstuvwxyz012345}\n", "looks like a key"),
    ("extra_headers: {X-Key: {environment: NAME}}\n", "extra_headers"),
    ("extra_headers: {X-Key: 12}\n", "extra_headers"),
    ('extra_headers: {X-Team: "a\\nb"}\n', "line break"),
    ('extra_headers: {X-Team: "a\\r"}\n', "line break"),
])
def test_bad_pacing_provider_and_cost_options_are_refused_with_exit_2(tmp_path, extra, words):
    cfg = write_config(tmp_path / "a", "http://127.0.0.1:9/v1", model_extra=extra)
    proc = cli("validate", str(cfg), env=cli_env(HOME=str(tmp_path)))
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    assert words in proc.stderr and "cfg.yaml" in proc.stderr, proc.stderr
    assert "sk-abcdefghijklmnopqrstuvwxyz012345" not in proc.stderr


# -- the pacing logic, with a fake clock ------------------------------------------------------


@pytest.mark.parametrize("text, seconds", [
    ("1s", 1.0), ("6m0s", 360.0), ("250ms", 0.25), ("1h2m3.5s", 3723.5), ("12.5", 12.5), ("0", 0.0),
    ("59.9s", 59.9), ("", None), ("soon", None), ("-1", None), ("1x", None), ("s", None), ("nan", None),
])
def test_reset_durations_are_read_in_openais_format_and_as_plain_seconds(text, seconds):
    from pipeline.llm.pacing import parse_duration

    assert parse_duration(text) == (pytest.approx(seconds) if seconds is not None else None)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_a_requests_budget_holds_requests_until_its_bucket_refills():
    from pipeline.llm.pacing import Pacer

    clock = Clock()
    pacer = Pacer(requests_per_minute=120, clock=clock)  # 2 per second, 2 at the start
    assert pacer.try_take(10, 0) == 10 and pacer.try_take(10, 1) == 10
    assert pacer.try_take(10, 2) == -1 and pacer.wait_s == pytest.approx(0.5)
    clock.now += 0.5
    assert pacer.try_take(10, 2) == 10
    pacer.settle(10, 3, 25)  # a task that sent 3 requests (re-asks) owes 2 more
    clock.now += 0.5
    assert pacer.try_take(10, 2) == -1 and pacer.wait_s == pytest.approx(1.0)


def test_a_tokens_budget_corrects_each_reservation_to_the_tokens_used():
    from pipeline.llm.pacing import Pacer

    clock = Clock()
    pacer = Pacer(tokens_per_minute=6000, clock=clock)  # 100 per second, 100 at the start
    assert pacer.try_take(100, 0) == 100
    assert pacer.try_take(100, 1) == -1
    pacer.settle(100, 1, 40)  # used 40 of the 100 reserved: 60 come back
    assert pacer.try_take(60, 0) == 60 and pacer.reserved == 60


def test_the_servers_headers_hold_requests_until_its_bucket_has_room():
    from pipeline.llm.pacing import Pacer

    clock = Clock()
    pacer = Pacer(clock=clock)
    headers = {"x-ratelimit-limit-requests": "60", "x-ratelimit-remaining-requests": "0",
               "x-ratelimit-reset-requests": "1m0s"}  # empty, refilled at 1 a second
    pacer.observe(headers, 1)
    assert pacer.try_take(None, 0) == -1 and pacer.wait_s == pytest.approx(1.0)
    clock.now += 1.0
    assert pacer.try_take(None, 0) > 0
    # Without the limit: what remains is all there is until the reset.
    pacer = Pacer(clock=clock)
    pacer.observe({"x-ratelimit-remaining-tokens": "50", "x-ratelimit-reset-tokens": "2s"}, 1)
    assert pacer.try_take(40, 0) == 40
    assert pacer.try_take(40, 1) == -1 and pacer.wait_s == pytest.approx(2.0)
    clock.now += 2.0
    assert pacer.try_take(40, 1) == 40
    assert pacer.snapshot()["headers"] == {"x-ratelimit-remaining-tokens": "50", "x-ratelimit-reset-tokens": "2s"}


@pytest.mark.parametrize("headers", [
    {"x-ratelimit-remaining-requests": "0", "x-ratelimit-reset-requests": "99999999999999999999s"},
    {"x-ratelimit-remaining-tokens": "0", "x-ratelimit-reset-tokens": "1e400"},
    {"x-ratelimit-limit-requests": "60", "x-ratelimit-remaining-requests": "0",
     "x-ratelimit-reset-requests": "100000h"},
])
def test_a_reset_of_days_or_garbage_holds_requests_a_minute_at_most(headers):
    """A server asking to wait for ever is asked again within MAX_RESET_S (a run never hangs on a
    header: one still refusing answers 429s, which AIMD and model_down_s handle)."""
    from pipeline.llm.pacing import MAX_RESET_S, Pacer

    clock = Clock()
    pacer = Pacer(clock=clock)
    pacer.observe(headers, 1)
    assert pacer.try_take(10, 0) == -1 and 0 < pacer.wait_s <= MAX_RESET_S
    clock.now += MAX_RESET_S
    assert pacer.try_take(10, 0) > 0


async def test_a_paced_limit_takes_no_permit_and_wakes_its_dispatcher_when_there_is_room():
    import asyncio

    from pipeline.llm.pacing import Pacer
    from pipeline.llm.throttle import AdaptiveLimit

    limit = AdaptiveLimit(8)
    limit.pacer = Pacer(requests_per_minute=120)  # 2 a second, 2 at the start: room again in 0.5 s
    while limit.try_acquire(5):
        pass
    held = limit.in_use
    assert held == 2  # the pacer said no before the permits ran out: nothing taken
    woken = asyncio.Event()
    limit.on_available = woken.set
    await asyncio.wait_for(woken.wait(), 10)
    assert limit.try_acquire(5) and limit.in_use == held + 1


@pytest.mark.slow
def test_cost_and_the_pacing_snapshot_are_recorded_in_postgresql_too(tmp_path, fake_server, postgres_url):
    url = fake_server(latency_ms=5, rpm_limit=6000)
    extra = "price_per_million_input_tokens: 1\nprice_per_million_output_tokens: 3\nmax_requests_per_minute: 6000\n"
    cfg = write_config(tmp_path / "a", url, records=10, model_extra=extra)
    home = tmp_path / "home"
    proc = cli("run", str(cfg), "--run-id", "pg", home=home, db=postgres_url, timeout=300)
    assert proc.returncode == 0, proc.stderr
    s = json.loads(cli("status", "pg", "--json", home=home, db=postgres_url, check=True).stdout)
    m = s["models"]["w"]
    assert m["cost"] == pytest.approx((m["prompt_tokens"] + 3 * m["completion_tokens"]) / 1e6)
    assert m["max_requests_per_minute"] == 6000
    assert m["rate_limit_headers"]["x-ratelimit-limit-requests"] == "6000"


def test_the_snapshot_a_run_stores_last_counts_every_request_so_far():
    """A run shorter than a second showed 0 requests/min (its first snapshot, taken before its
    first request settled, was reused); then one that ended within a second of a snapshot
    showed that snapshot (400 requests as "1"). A snapshot is now fresh at every call and
    counts the requests of the task whose event carries it, which settles just after."""
    from pipeline.llm.pacing import Pacer

    clock = Clock()
    pacer = Pacer(clock=clock)
    assert pacer.snapshot(1, 20)["requests_per_minute"] == 1  # the first task's own request
    pacer.settle(0, 1, 20)
    clock.now += 0.1
    first = pacer.snapshot()
    assert first["requests_per_minute"] == 1 and first["tokens_per_minute"] == 20
    for _ in range(399):
        pacer.settle(0, 1, 20)
    last = pacer.snapshot(1, 20)  # within the same second: not the first one again
    assert (last["requests_per_minute"], last["tokens_per_minute"]) == (401, 8020)


def test_requests_per_minute_counts_the_last_minute_and_never_extrapolates_a_short_run():
    """A 4-second run of 1,200 requests showed 18,000 requests/min (its count scaled up to a
    minute), far over the budget it kept; status shows what a per-minute budget counts."""
    from pipeline.llm.pacing import Pacer

    clock = Clock()
    pacer = Pacer(clock=clock)
    for _ in range(4):
        for _ in range(300):
            pacer.settle(0, 1, 10)
        clock.now += 1.0
    assert (pacer.snapshot()["requests_per_minute"], pacer.snapshot()["tokens_per_minute"]) == (1200, 12000)
    clock.now += 56.5  # 60 s after the first second: its 300 leave the window
    pacer.settle(0, 1, 10)
    assert pacer.snapshot()["requests_per_minute"] == 901


def test_status_of_a_run_shorter_than_a_minute_shows_every_request_it_made_per_minute(tmp_path, fake_server):
    """After a run of a few seconds, `status` showed "req/min 1" for 400 requests: the stored
    snapshot was the one of the run's first second."""
    url = fake_server(latency_ms=1)
    cfg = write_config(tmp_path / "a", url, records=60)
    home = tmp_path / "home"
    proc = cli("run", str(cfg), "--run-id", "short", home=home, timeout=300)
    assert proc.returncode == 0, proc.stderr
    m = json.loads(cli("status", "short", "--json", home=home, check=True).stdout)["models"]["w"]
    assert m["requests"] >= 60
    assert m["requests_per_minute"] == m["requests"]  # all within the last minute
    assert m["tokens_per_minute"] == m["prompt_tokens"] + m["completion_tokens"]
