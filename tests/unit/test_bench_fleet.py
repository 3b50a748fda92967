"""The arithmetic of `inferq bench fleet` (the benchmark itself is run by hand, not here):
a wrong subtraction or threshold would state the broker's capacity wrongly in the docs."""

from __future__ import annotations

from collections import Counter

import pytest

from bench.fleet import (
    GOAL_RATE,
    GOAL_WORKERS,
    Usage,
    capacity,
    net_per_job,
    parse_commandstats,
    parse_monitor,
    section,
    shas_in,
    slope,
    summarize,
)


def test_commandstats_as_redis_py_parses_it() -> None:
    info = {
        "cmdstat_get": {"calls": 3, "usec": 9, "usec_per_call": 3.0},
        "cmdstat_client|setinfo": {"calls": 2, "usec": 2, "usec_per_call": 1.0},
        "errorstat_NOSCRIPT": {"count": 1},
    }
    assert parse_commandstats(info) == ({"get": 3, "client|setinfo": 2}, {"get": 9, "client|setinfo": 2})


def test_a_window_less_idle_scales_idle_by_its_length_and_never_goes_below_zero() -> None:
    before = Usage(100.0, 1.0, 1.5, {"evalsha": 10, "brpop": 5}, {"evalsha": 100, "brpop": 50}, 0.5, 40)
    after = Usage(104.0, 1.5, 2.1, {"evalsha": 210, "brpop": 6}, {"evalsha": 2100, "brpop": 60}, 0.7, 140)
    run = after.since(before)
    assert run.seconds == pytest.approx(4.0)
    assert run.calls == {"evalsha": 200, "brpop": 1}
    idle = Usage(2.0, 0.01, 0.02, {"brpop": 2}, {"brpop": 20}, 0.005, 5)
    net = run.less_idle(idle)
    assert net.cpu_main_s == pytest.approx(0.5 - 0.02)
    assert net.sys_main_s == pytest.approx(0.2 - 0.01)
    assert net.reads == 90
    assert net.calls == {"evalsha": 200, "brpop": 0}  # fewer BRPOP timeouts than idle: 0
    assert net.usec["brpop"] == 0


def test_capacity_and_the_goal_threshold() -> None:
    # 100 workers x 20 jobs/s = 2000 jobs/s per core: 0.5 ms per job is exactly the goal
    assert capacity(0.5, GOAL_RATE) == pytest.approx(GOAL_WORKERS)
    assert capacity(0.5, 50) == pytest.approx(40)
    assert capacity(0.5, 20, idle_ms_per_worker_s=10) == pytest.approx(50)


def test_slope_of_idle_cpu_against_workers() -> None:
    assert slope([(1, 3.0), (2, 5.0), (4, 9.0), (8, 17.0)]) == pytest.approx(2.0)
    assert slope([(4, 8.0)]) == pytest.approx(2.0)


def test_summary_says_whether_the_goal_is_met() -> None:
    runs = [
        {"path": "jobs", "workers": 1, "valkey_cpu_ms_per_job": 0.4},
        {"path": "jobs", "workers": 2, "valkey_cpu_ms_per_job": 0.45},
        {"path": "jobs", "workers": 4, "valkey_cpu_ms_per_job": 0.9},
    ]
    res = summarize(runs, {1: 0.5, 2: 0.5, 4: 0.5})
    assert res["capacity"]["jobs"]["valkey_cpu_ms_per_job"] == pytest.approx(0.45)
    assert res["goal_met"] is True
    assert summarize(runs, {1: 1.0, 2: 11.0})["goal_met"] is False  # 10 ms/s per idle worker


MONITOR_LINES = [
    "+OK",
    '+1.0 [0 127.0.0.1:5000] "ECHO" "inferq-fleet:idle"',
    '+1.1 [0 127.0.0.1:6000] "BRPOP" "lane" "1"',
    '+2.0 [0 127.0.0.1:5000] "ECHO" "inferq-fleet:jobs"',
    '+2.1 [0 127.0.0.1:7000] "EVALSHA" "ABCDEF0123" "2" "k1" "k2"',
    '+2.2 [0 lua] "HSET" "inferq:job:1" "status" "running"',
    '+2.3 [0 lua] "XADD" "inferq:events:1" "*"',
    '+2.4 [0 127.0.0.1:6000] "BRPOP" "lane" "1"',
    '+2.5 [0 127.0.0.1:6000] "BRPOP" "lane" "1"',
    '+3.0 [0 127.0.0.1:5000] "ECHO" "inferq-fleet:end"',
]


def test_monitor_windows_roles_and_script_commands() -> None:
    assert shas_in(MONITOR_LINES) == {"abcdef0123"}
    roles = {5000: "bench", 6000: "worker parent", 7000: "worker child"}
    w = parse_monitor(MONITOR_LINES, roles, {"abcdef0123": "transition"})
    assert w["idle"].top == Counter({("worker parent", "BRPOP"): 1})
    assert w["jobs"].top == Counter(
        {("worker child", "EVALSHA transition"): 1, ("worker parent", "BRPOP"): 2}
    )
    assert w["jobs"].lua == Counter({("transition", "HSET"): 1, ("transition", "XADD"): 1})
    per_job = net_per_job(w["jobs"].top, w["idle"].top, 1.0, 1)
    assert per_job == {("worker child", "EVALSHA transition"): 1.0, ("worker parent", "BRPOP"): 1.0}


def test_section_renders_every_run_and_the_verdict() -> None:
    run = {
        "path": "jobs",
        "workers": 2,
        "jobs": 100,
        "jobs_per_s": 500.0,
        "valkey_cpu_ms_per_job": 0.6,
        "valkey_sys_share": 0.4,
        "commands_per_job": 40.0,
        "round_trips_per_job": 20.0,
        "valkey_core_share": 0.3,
        "top_commands": [{"command": "evalsha", "calls_per_job": 3.0, "us_per_job": 120.0}],
    }
    res = {"runs": [run], "idle_valkey_ms_per_s_by_workers": {"2": 1.0}, **summarize([run], {2: 1.0})}
    text = "\n".join(section(res))
    assert "| jobs | 2 | 100 | 500.0 | 0.600 | 0.4 | 40.0 | 20.0 | 0.3 | 1.00 |" in text
    assert "NOT met" in text
    assert "| evalsha | 3.0 | 120.0 |" in text
