"""A test that starts processes leaves none behind when it fails: ``processes.running`` stops the whole group."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time

import pytest

from processes import group_pids, run, running

TESTS = os.path.dirname(os.path.abspath(__file__))


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def wait_for_group(pgid: int, count: int) -> list:
    deadline = time.monotonic() + 20
    while len(group_pids(pgid)) < count:
        assert time.monotonic() < deadline, "the children did not start"
        time.sleep(0.05)
    return group_pids(pgid)


def test_a_failing_block_stops_the_process_and_its_children():
    # bash ignores SIGTERM here, so the group gets SIGKILL after the grace period
    script = "trap '' TERM; sleep 300 & sleep 300 & wait"
    with pytest.raises(RuntimeError, match="test body failed"):
        with running(["bash", "-c", script], grace=1.0) as proc:
            pids = wait_for_group(proc.pid, 3)
            raise RuntimeError("test body failed")
    assert proc.returncode is not None
    assert [pid for pid in pids if alive(pid)] == []


def test_a_failing_test_leaves_no_process(tmp_path):
    """A real pytest run whose test fails after starting a server-like process tree through a fixture."""
    pid_file = tmp_path / "pids"
    (tmp_path / "test_inner.py").write_text(textwrap.dedent(f"""
        import subprocess, sys, time
        import pytest
        sys.path.insert(0, {TESTS!r})
        from processes import group_pids, running

        @pytest.fixture
        def server():
            with running([sys.executable, "-c", "import subprocess, sys, time; "
                          "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(300)']); time.sleep(300)"]) as proc:
                yield proc

        def test_fails(server):
            while len(group_pids(server.pid)) < 2:
                time.sleep(0.05)
            open({str(pid_file)!r}, "w").write(" ".join(map(str, group_pids(server.pid))))
            assert False, "the body failed"
    """))
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tmp_path / "test_inner.py")],
                            capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert result.returncode == 1 and "the body failed" in result.stdout, result.stdout + result.stderr
    pids = [int(p) for p in pid_file.read_text().split()]
    assert len(pids) == 2 and [pid for pid in pids if alive(pid)] == []


def test_run_stops_the_whole_group_on_a_timeout(tmp_path):
    """``subprocess.run`` would kill bash alone and then wait for the background sleep holding its pipes."""
    script = f"sleep 300 & echo $! > {tmp_path / 'pid'}; wait"
    started = time.monotonic()
    with pytest.raises(subprocess.TimeoutExpired):
        run(["bash", "-c", script], timeout=2)
    assert time.monotonic() - started < 30
    assert not alive(int((tmp_path / "pid").read_text()))
    assert run([sys.executable, "-c", "print('done')"], timeout=60).stdout == "done\n"
