"""Executors: in-process, a local process pool and process hosts, and Ray (marked ``ray``)."""

from __future__ import annotations

import importlib
import math
import operator
import os

import pytest

from gradlens import GradlensError
from gradlens.search import LocalExecutor, RayExecutor, make_executor
from gradlens.search.simplex import grid_size


def test_inline_submit_map_and_errors():
    with LocalExecutor(workers=1) as ex:
        assert ex.workers == 1
        assert ex.submit(operator.mul, 6, 7).result() == 42
        fut = ex.submit(grid_size, 0, 3)
        with pytest.raises(GradlensError, match="n_tasks"):
            fut.result()
        started = []
        got = dict(
            (i, f.result())
            for i, f in ex.map_unordered(pow, [(2, k) for k in range(5)], on_submit=started.append)
        )
        assert got == {k: 2**k for k in range(5)}
        assert started == list(range(5))


def test_inline_host_keeps_state_in_this_process():
    with LocalExecutor(workers=1) as ex:
        h = ex.host(list, [1])
        h.call("append", 2).result()
        assert h.call("copy").result() == [1, 2]
        osmod = ex.host(importlib.import_module, "os")
        assert osmod.call("getpid").result() == os.getpid()


def test_default_workers():
    assert LocalExecutor().workers == max(1, min(os.cpu_count() or 1, 2))


def test_make_executor_errors():
    with pytest.raises(GradlensError, match=r"`kind` should be one of"):
        make_executor("dask")
    with pytest.raises(GradlensError, match=r"`address` is only for the Ray executor"):
        make_executor("local", address="auto")
    with pytest.raises(GradlensError, match=r"`workers` should be an int >= 1 or None; found 0"):
        LocalExecutor(workers=0)


@pytest.mark.slow
def test_process_pool_and_process_hosts():
    with LocalExecutor(workers=2) as ex:
        # trials run in other processes, at most two at a time
        pids = {f.result() for _, f in ex.map_unordered(os.getpid, [()] * 4)}
        assert os.getpid() not in pids
        assert 1 <= len(pids) <= 2
        with pytest.raises(GradlensError, match="n_tasks"):  # errors cross the process boundary
            ex.submit(grid_size, 0, 3).result()
        # two hosts: each keeps its own state in its own process, calls run in order
        a, b = ex.host(list, []), ex.host(list, [9])
        for k in range(3):
            a.call("append", k)
        assert a.call("copy").result() == [0, 1, 2]
        assert b.call("copy").result() == [9]
        pa = ex.host(importlib.import_module, "os")
        assert pa.call("getpid").result() != os.getpid()
        assert math.isclose(ex.submit(math.fsum, [0.1] * 10).result(), 1.0)
        # a host whose process dies fails its pending calls instead of hanging
        dead = ex.host(importlib.import_module, "os")
        fut = dead.call("_exit", 3)
        with pytest.raises(RuntimeError, match=r"exit code 3"):
            fut.result(timeout=60)
        with pytest.raises(RuntimeError):
            dead.call("getpid").result(timeout=60)


@pytest.mark.slow
@pytest.mark.ray
def test_ray_submit_and_hosts():
    pytest.importorskip("ray")
    ex = RayExecutor(workers=2)
    try:
        assert ex.workers == 2
        got = sorted(f.result() for _, f in ex.map_unordered(pow, [(3, k) for k in range(4)]))
        assert got == [1, 3, 9, 27]
        with pytest.raises(GradlensError, match="n_tasks"):
            ex.submit(grid_size, 0, 3).result()
        h = ex.host(list, [1])
        h.call("append", 5).result()
        assert h.call("copy").result() == [1, 5]
    finally:
        ex.close()
