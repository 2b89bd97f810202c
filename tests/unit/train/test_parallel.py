"""`distill.train.parallel`: jobs in worker processes, one torch thread each, errors surfaced."""

from __future__ import annotations

import os

import pytest

from distill.train.parallel import WorkerPool, map_processes
from training_helpers import worker_probe


def test_workers_run_jobs_in_other_processes_on_one_thread_and_stop_at_the_first_error():
    with WorkerPool(2) as pool:
        got = dict(pool.map(worker_probe, [1, 2, 3, 4]))
        assert [got[i][0] for i in range(4)] == [1, 4, 9, 16]  # results keep their job's index
        assert {threads for _, threads, _ in got.values()} == {1}
        assert os.getpid() not in {pid for _, _, pid in got.values()}
        again = dict(pool.map(worker_probe, [5, 6, 7]))
        # A second batch reuses the pool: never more processes than workers (each costs seconds to start).
        assert len({pid for _, _, pid in [*got.values(), *again.values()]}) <= 2
        with pytest.raises(ValueError, match="negative input -1"):
            list(pool.map(worker_probe, [2, -1, 3]))


def test_one_worker_runs_here_in_order():
    got = list(map_processes(worker_probe, [3, 1], workers=1))
    assert [(i, r[0]) for i, r in got] == [(0, 9), (1, 1)] and {r[2] for _, r in got} == {os.getpid()}
    for bad in (0, 1.5, True):
        with pytest.raises(ValueError, match="workers must be an integer >= 1"):
            WorkerPool(bad)


def test_a_worker_that_dies_is_one_clear_error(tmp_path):
    import subprocess
    import sys

    # A script without the __main__ guard: each spawned worker re-runs it and dies; the caller says why.
    script = tmp_path / "unguarded.py"
    script.write_text(
        "from distill.train.parallel import WorkerPool\nfrom training_helpers import worker_probe\n"
        "with WorkerPool(2) as pool:\n    print(list(pool.map(worker_probe, [1, 2])))\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode != 0
    assert "if __name__ == '__main__':" in done.stderr and "workers=1" in done.stderr
