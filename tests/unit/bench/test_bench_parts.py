"""The pure parts of `make bench` (benchmarks/): what the load generators' output is read as,
the /proc CPU accounting, the docs table writer. No load is run and nothing is timed."""

from __future__ import annotations

import asyncio
import base64
import json
import math
import os
import subprocess
import sys
import time

import pytest

from benchmarks import bodies, gateways, load, memory, nginx, procs, profiling, report, tools

WRK_OUT = """Running 5s test @ http://127.0.0.1:43737/v1/chat/completions
  1 threads and 16 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency     2.40ms  408.06us   1.02s    96.11%
    Req/Sec     6.61k     2.32k   9.46k    70.00%
  Latency Distribution
     50%  812.00us
     75%    1.20ms
     90%    2.00ms
     99%    1.50s
  33012 requests in 5.00s, 17.89MB read
  Socket errors: connect 0, read 2, write 0, timeout 3
  Non-2xx or 3xx responses: 7
Requests/sec:   6602.40
Transfer/sec:      3.58MB
"""

VEGETA_REPORT = {
    "latencies": {
        "total": 43661565,
        "mean": 873231,
        "50th": 607124,
        "90th": 960266,
        "95th": 2161030,
        "99th": 7265169,
        "max": 7265169,
        "min": 351120,
    },
    "requests": 50,
    "rate": 51.03,
    "throughput": 46.9,
    "success": 0.96,
    "status_codes": {"200": 48, "503": 1, "0": 1},
    "errors": ["503 Service Unavailable"],
}


def test_wrk_output_is_read_with_units_and_every_kind_of_error():
    run = load.parse_wrk(WRK_OUT)
    assert run.p50 == pytest.approx(0.812)
    assert run.p99 == pytest.approx(1500.0)
    assert run.rps == pytest.approx(6602.40)
    assert run.requests == 33012
    assert run.errors == 7 + 2 + 3  # non-2xx and socket errors alike
    assert not run.valid


def test_wrk_durations_and_garbage():
    assert load.to_ms("63.00us") == pytest.approx(0.063)
    assert load.to_ms("1.00m") == pytest.approx(60000.0)
    assert load.to_ms("2s") == pytest.approx(2000.0)
    assert math.isnan(load.to_ms("fast"))
    empty = load.parse_wrk("unable to connect to 127.0.0.1:1 Connection refused")
    assert empty.requests == 0 and not empty.valid
    nothing = load.parse_wrk(WRK_OUT.replace("33012 requests", "0 requests").replace("812.00us", "0.00us"))
    assert math.isnan(nothing.p50) and math.isnan(nothing.p99)


def test_wrk_script_keeps_a_body_with_quotes_and_newlines_intact():
    body = bodies.encode({"messages": [{"content": 'say "hi"\nand \\ go'}]})
    script = load.wrk_script(body, {"Authorization": "Bearer k"})
    assert 'wrk.method = "POST"' in script
    # the Lua string literals used here are JSON string literals; read them back as JSON
    literal = script.splitlines()[1].split(" = ", 1)[1]
    assert json.loads(literal).encode() == body
    assert 'wrk.headers["Authorization"] = "Bearer k"' in script


def test_vegeta_target_and_report():
    target = json.loads(load.vegeta_target("http://127.0.0.1:1/v1/chat/completions", b'{"a":1}', {"X": "y"}))
    assert base64.b64decode(target["body"]) == b'{"a":1}'
    assert target["header"] == {"Content-Type": ["application/json"], "X": ["y"]}
    run = load.parse_vegeta_report(json.dumps(VEGETA_REPORT), rate=50)
    assert run.p50 == pytest.approx(0.607124) and run.p99 == pytest.approx(7.265169)
    assert run.requests == 50 and run.errors == 2 and run.rate == 50 and run.rps == pytest.approx(46.9)


def test_proc_stat_cpu_fields_survive_a_command_name_with_spaces_and_parentheses():
    # pid (comm) state ppid pgrp session tty tpgid flags minflt cminflt majflt cmajflt utime stime ...
    line = "4242 (uvicorn (worker) 1) S 4200 4242 4242 0 -1 4194560 100 0 0 0 731 269 0 0 20 0 3 0"
    assert procs.parse_stat_cpu_ticks(line) == 731 + 269
    assert procs.parse_stat_ppid(line) == 4200
    assert procs.per_request_us(1.0, 1.5, 5000) == pytest.approx(100.0)
    assert procs.per_request_us(1.0, 1.5, 0) == pytest.approx(500000.0)  # no division by zero


def test_cpu_seconds_counts_a_child_process_and_grows_with_work():
    child = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
    try:
        assert child.pid in procs.process_tree(os.getpid())
        before = procs.cpu_seconds(os.getpid())
        deadline = time.monotonic() + 30
        while procs.cpu_seconds(os.getpid()) - before < 0.05:  # burn CPU until /proc shows it
            sum(i * i for i in range(20000))
            assert time.monotonic() < deadline, "CPU time never advanced in /proc"
        assert procs.rss_kb(os.getpid()) > procs.rss_kb(child.pid) > 0
    finally:
        child.stdin.close()
        child.wait(10)


def _run(p50, p99, rps, **cpu):
    return load.Run(p50=p50, p99=p99, rps=rps, requests=int(rps * 5), cpu_us=cpu)


def _results() -> report.Results:
    res = report.Results(gateways=["Atlas abc"], meta={"started": "2026-12-01 23:00 UTC", "duration": "5"})
    res.closed = {
        "nginx directly": {1: _run(0.06, 0.59, 12000, nginx=10), 16: _run(0.12, 0.43, 128162, nginx=8)},
        "Atlas abc → nginx": {
            1: _run(0.41, 1.01, 2000, **{"gateway": 140, "redis-server": 28}),
            16: _run(2.0, 7.0, 6595, **{"gateway": 149, "redis-server": 19}),
        },
    }
    res.fixed = {
        "nginx directly": {500: _run(0.2, 0.6, 500, nginx=30), 2000: "not run: over capacity"},
        "Atlas abc → nginx": {500: _run(0.5, 1.2, 500, gateway=200)},
    }
    res.prompts = {
        "nginx directly": {
            (1024, False): _run(0.05, 0.1, 1),
            (204800, False): _run(0.15, 0.3, 1),
            (1024, True): _run(0.06, 0.1, 1),
            (204800, True): _run(0.2, 0.3, 1),
        },
        "Atlas abc → nginx": {
            (1024, False): _run(0.75, 1, 1),
            (204800, False): _run(0.95, 1, 1),
            (1024, True): _run(1.16, 2, 1),
            (204800, True): _run(2.4, 3, 1),
        },
    }
    return res


def test_targets_are_judged_from_the_measured_runs():
    judged = [(text, values["Atlas abc"]) for text, values in report.targets(_results())]
    verdicts = {text.split(" ≤")[0]: value for text, value in judged}
    assert verdicts["gateway CPU per request at c=16"] == ("149 µs", False)
    assert verdicts["gateway CPU per request at c=1"] == ("140 µs", True)
    assert verdicts["added p99 at c=1"] == ("0.42 ms", True)  # 1.01 - 0.59
    assert verdicts["p99 at c=16"][1] is False  # 7.0 > 3 × 2.0
    big = [v for t, v in judged if t.startswith("200 KB prompt adds")]
    assert big == [("0.10 ms", True), ("1.10 ms", False)]  # (0.80 - 0.70), (2.20 - 1.10)
    assert verdicts["redis-server CPU per request"] == ("19 µs", True)
    noisy = _results()
    noisy.closed["nginx directly"][1].p99 = 2.0  # the reference's own tail above Atlas's
    added = {t.split(" ≤")[0]: v["Atlas abc"] for t, v in report.targets(noisy)}["added p99 at c=1"]
    assert added[1] is None and "noise" in added[0]


def test_rendered_tables_have_the_issue_columns_and_say_met_or_missed():
    text = report.render(_results())
    assert "| target | req/s c=16 | p50 c=1 | p99 c=1 | p99 c=16 | CPU per request |" in text
    assert (
        "| Atlas abc → nginx | 6,595 | 0.41 ms | 1.01 ms | 7.00 ms | 149 µs (c=16), 140 µs (c=1), plus 19 µs in redis-server |"
        in text
    )
    assert "not run: over capacity" in text
    assert "0.95 ms (+0.80)" in text
    assert "**missed**" in text and ": met" in text


def test_docs_section_is_inserted_once_then_replaced_and_the_rest_kept():
    doc = "# Benchmarks\n\nintro\n\n## Results\n\nolder results\n"
    first = report.replace_section(doc, "table one")
    assert (
        first.index("## Results")
        < first.index(report.BEGIN)
        < first.index("table one")
        < first.index(report.END)
        < first.index("older results")
    )
    second = report.replace_section(first, "table two")
    assert "table one" not in second and second.count(report.BEGIN) == 1 and second.count("table two") == 1
    assert second.replace("table two", "table one") == first
    assert report.replace_section("no heading", "t").endswith(f"{report.BEGIN}\n\nt\n\n{report.END}\n")


def test_prompt_bodies_have_the_asked_size_and_streams_their_own_model():
    for size in (1024, 204800):
        for stream in (False, True):
            doc = bodies.chat(size, stream)
            assert abs(len(bodies.encode(doc)) - size) <= 2
            assert doc["model"] == (bodies.STREAM_MODEL if stream else bodies.MODEL)
            assert doc.get("stream", False) is stream


def test_static_sse_stream_ends_with_usage_and_done():
    events = [e for e in bodies.sse_stream(3).split("\n\n") if e]
    assert events[-1] == "data: [DONE]"
    assert json.loads(events[-2][6:])["usage"]["completion_tokens"] == 3
    assert json.loads(events[-3][6:])["choices"][0]["finish_reason"] == "stop"


def test_nginx_config_serves_both_locations_and_refuses_variables(tmp_path):
    conf = nginx.config(18080, str(tmp_path))
    assert "listen 127.0.0.1:18080" in conf and "daemon off;" in conf
    assert f"location = {nginx.JSON_BASE}/v1/chat/completions" in conf
    assert f"location = {nginx.SSE_BASE}/v1/chat/completions" in conf
    assert nginx._quoted("it's") == "'it\\'s'"
    with pytest.raises(ValueError):
        nginx._quoted("costs $5")


def test_profile_is_summed_per_function_by_own_and_total_time():
    collapsed = (
        'process 7:"python -m atlas_gateway";main (atlas_gateway/__main__.py:60);run (asyncio/runners.py:1);'
        "handle (atlas_gateway/proxy.py:10);loads (json/__init__.py:346) 30\n"
        "run (asyncio/runners.py:1);handle (atlas_gateway/proxy.py:12);send (uvicorn/server.py:99) 50\n"
        "run (asyncio/runners.py:1);handle (atlas_gateway/proxy.py:12) 20\n"
        "garbage line\n"
    )
    samples, own, total = profiling.top_functions(collapsed)
    assert samples == 100
    assert own[0] == ("send (server.py)", 50)
    assert dict(total) == {"handle (proxy.py)": 100}  # lines 10 and 12: one function; only Atlas's
    assert "50.0 %  send (server.py)" in profiling.report(collapsed)


def test_tool_paths_are_read_from_the_install_script_output():
    out = "[tools] building...\nVEGETA=/c/vegeta-v12/vegeta\nPY_SPY=/c/py-spy-0.4.3/bin/py-spy\nnot=a path\n"
    assert tools.parse_tool_lines(out) == {"VEGETA": "/c/vegeta-v12/vegeta", "PY_SPY": "/c/py-spy-0.4.3/bin/py-spy"}


def test_other_checkouts_come_first_and_a_wrong_path_is_refused(tmp_path):
    (tmp_path / "gateway" / "atlas_gateway").mkdir(parents=True)
    found = gateways.sources({"BENCH_GATEWAY_SRC": str(tmp_path)})
    assert [s.root for s in found] == [tmp_path.resolve(), gateways.HERE_ROOT]
    assert found[0].pythonpath.split(os.pathsep)[:2] == [str(tmp_path / "gateway"), str(tmp_path / "core")]
    only = gateways.sources({"BENCH_GATEWAY_SRC": str(tmp_path), "BENCH_SKIP_SELF": "1"})
    assert [s.root for s in only] == [tmp_path.resolve()]
    with pytest.raises(SystemExit, match="no gateway/atlas_gateway"):
        gateways.sources({"BENCH_GATEWAY_SRC": str(tmp_path / "missing")})


def test_memory_probe_reads_whole_answers_chunked_or_not():
    async def read(raw: bytes) -> tuple[int, bytes]:
        reader = asyncio.StreamReader()
        reader.feed_data(raw + b"NEXT")
        status = await memory._read_answer(reader)
        return status, await reader.read(4)

    chunked = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"
    sized = b"HTTP/1.1 429 Too Many Requests\r\nContent-Length: 2\r\n\r\n{}"
    assert asyncio.run(read(chunked)) == (200, b"NEXT")  # nothing of the next answer consumed
    assert asyncio.run(read(sized)) == (429, b"NEXT")
    request = memory._request("sk-x", b"{}", {"x-mock-chunk-delay-ms": "1000"})
    assert request.endswith(b"\r\n\r\n{}") and b"Content-Length: 2\r\n" in request
    assert b"x-mock-chunk-delay-ms: 1000\r\n" in request


def test_atlas_cpu_is_divided_by_both_floors_and_judged_against_the_bare_forward():
    res = _results()
    res.closed[report.NGINX_PROXY] = {
        1: _run(0.1, 0.2, 9000, **{"nginx proxy": 25}),
        16: _run(0.4, 0.9, 36000, **{"nginx proxy": 20}),
    }
    res.closed[report.BARE_FORWARD] = {
        1: _run(0.3, 0.5, 3000, **{"bare forward": 300}),
        16: _run(1.5, 3.0, 7000, **{"bare forward": 100}),
    }
    assert report.ratio(res, "Atlas abc → nginx", report.BARE_FORWARD) == pytest.approx(1.49)
    assert report.ratio(res, "Atlas abc → nginx", report.NGINX_PROXY) == pytest.approx(7.45)
    text = report.render(res)
    assert "| CPU c=16 ÷ nginx proxy | CPU c=16 ÷ bare forward |" in text
    assert "| 7.45× | 1.49× |" in text  # Atlas's row: its own CPU, not redis-server's
    floor_verdict = [v["Atlas abc"] for t, v in report.targets(res) if "bare forward" in t]
    assert floor_verdict == [("1.49×", False)]
    added = [v["Atlas abc"] for t, v in report.targets(res) if t.startswith("added p50")]
    assert added == [("0.35 ms", False)]  # 0.41 - 0.06
    assert "÷ bare forward" not in report.render(_results())  # no floors measured: no columns


def test_nginx_reverse_proxy_keeps_upstream_connections_alive(tmp_path):
    conf = nginx.proxy_config(18081, str(tmp_path), 18080)
    assert "server 127.0.0.1:18080; keepalive 64;" in conf
    assert "proxy_http_version 1.1;" in conf and 'proxy_set_header Connection "";' in conf
    assert "listen 127.0.0.1:18081" in conf


def test_raw_client_reuses_its_connection_and_reads_status_type_and_body():
    from benchmarks.raw_client import RawClient

    async def scenario():
        seen: list[bytes] = []

        async def serve(reader, writer):
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = int(
                    [ln for ln in head.split(b"\r\n") if ln.lower().startswith(b"content-length")][0].split(b":")[1]
                )
                seen.append(head.split(b"\r\n")[0] + b" " + await reader.readexactly(length))
                answer = b'{"n":%d}' % len(seen)
                writer.write(
                    b"HTTP/1.1 201 Created\r\ncontent-type: application/x-test\r\ncontent-length: %d\r\n\r\n%s"
                    % (len(answer), answer)
                )

        server = await asyncio.start_server(serve, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        client = RawClient(f"http://127.0.0.1:{port}/base")
        first = await client.post("/v1/x", b'{"a":1}', {"content-type": "application/json"})
        second = await client.post("/v1/x", b"{}", {})
        await client.close()
        server.close()
        return first, second, seen, len(client.idle)

    first, second, seen, idle = asyncio.run(scenario())
    assert first == (201, b"application/x-test", b'{"n":1}') and second[2] == b'{"n":2}'
    assert seen == [b'POST /base/v1/x HTTP/1.1 {"a":1}', b"POST /base/v1/x HTTP/1.1 {}"]
    assert idle == 0  # closed


def test_callgrind_totals_and_floor_candidates(tmp_path):
    from benchmarks import floor, instructions

    dump = tmp_path / "callgrind.x.1"
    dump.write_text("version: 1\ncreator: callgrind\nevents: Ir\nfn=main\n0 5\nsummary: 123456\ntotals: 123456\n")
    assert instructions._total(str(dump)) == 123456
    (tmp_path / "empty").write_text("events: Ir\n")
    with pytest.raises(RuntimeError):
        instructions._total(str(tmp_path / "empty"))
    assert floor.label("atlas/aiohttp").startswith("bare forward: Atlas's server")
    assert floor._installed("atlas/aiohttp")  # aiohttp and uvicorn are the gateway's own
    assert all("/" in c for c in floor.DEFAULT)
