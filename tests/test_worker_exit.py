"""A torchrun worker of a pipeline ends without destroying its gloo process group. Gloo's destructor, run by
the main thread with the GIL held (the last reference to the group going with a pipeline's locals), waits
for gloo's threads, one of which may still be finishing a collective and needs the GIL to free its tensors:
a rank deadlocked so, once in 30 two-node runs under load, and its launcher's peers gave up after 300 s. Here
a collective is still in flight on a gloo thread when the job's references go, as in the pipelines. The
deadlock could not be made certain here (it needs a gloo thread to lose the race for the GIL); the test
checks what prevents it: the worker runs its exit handlers and ends with ``os._exit``, no teardown."""

import sys
import textwrap

from processes import run

WORKER = textwrap.dedent('''
    import atexit, dataclasses, sys, time
    import torch, torch.distributed as dist
    from retrievals.pipelines.cli import leave_process_group, run_cli

    @dataclasses.dataclass
    class Flags:
        pass

    def job(flags):
        dist.init_process_group("gloo")
        model = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(4, 4))  # its reducer holds the group
        group, rank = model.process_group, dist.get_rank()
        leave_process_group()
        if rank == 1:
            time.sleep(1)                   # rank 0's gather waits for this rank on a gloo thread...
        sent, got = torch.full((4,), float(rank)), [torch.empty(4) for _ in range(2)]
        group.allgather([got], [sent])
        del sent, got, group                # ...the only holder of these tensors now
        sum(range(40_000_000))              # the main thread holds the GIL past the gather's end
        del model                           # the reducer goes
        atexit.register(lambda: print(f"rank {rank}: exit handlers ran", flush=True))

    class Teardown:
        def __del__(self):                  # runs only if the interpreter is torn down
            print("interpreter teardown ran", flush=True)

    TEARDOWN = Teardown()

    sys.exit(run_cli([Flags], job, []))
''')


def test_a_worker_ends_while_gloo_finishes_a_collective(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    done = run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                "--monitor_interval", "0.2", str(script)], timeout=60)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "rank 0: exit handlers ran" in done.stdout and "rank 1: exit handlers ran" in done.stdout
    assert "interpreter teardown ran" not in done.stdout  # the process group is never destroyed
