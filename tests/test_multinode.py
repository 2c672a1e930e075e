"""Two nodes simulated on this machine: two ``torchrun --nnodes 2`` launchers meeting through c10d rendezvous
train ``embed`` exactly like one launcher with two processes; a node lost mid-run (its launcher and workers
killed) is recovered by restarting the job, which resumes from the last complete checkpoint and ends with
the weights of the uninterrupted run."""

import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from processes import run, stop_group
from retrievals.trainer.checkpoints import last_complete_checkpoint
from test_pipelines import write_pairs
from test_serving_cli import free_port

pytestmark = pytest.mark.slow
STEPS = 120



def embed_flags(model_dir, data, out):
    return ["-m", "retrievals.pipelines.embed", "--output_dir", str(out), "--model_name_or_path", model_dir,
            "--do_train", "--data_name_or_path", data, "--per_device_train_batch_size", "4", "--max_steps", str(STEPS),
            "--learning_rate", "5e-4", "--logging_steps", "10", "--use_cpu", "True", "--report_to", "none",
            "--negatives_cross_device", "True", "--ddp_backend", "gloo", "--save_strategy", "steps",
            "--save_steps", "10", "--disable_tqdm", "True"]


ENV = dict(os.environ, OMP_NUM_THREADS="1")


def node(node_rank, port, flags, log):
    """One node's launcher; its own session, so the test can take the node down with everything under it."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node_rank", str(node_rank),
           "--nproc_per_node", "1", "--rdzv_backend", "c10d", "--rdzv_endpoint", f"127.0.0.1:{port}",
           "--rdzv_id", "embed-job", "--max_restarts", "0", "--monitor_interval", "0.5", *flags]
    return subprocess.Popen(cmd, env=ENV, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


@pytest.fixture
def launched():
    """The launchers a test starts; each is stopped with its process group (its workers) at the end of the test,
    however it ends."""
    launchers = []
    yield launchers
    for proc in launchers:
        stop_group(proc)


def two_nodes(flags, tmp_path, tag, launched):
    port = free_port()
    with open(tmp_path / f"{tag}-0.log", "w") as log0, open(tmp_path / f"{tag}-1.log", "w") as log1:
        launched.append(node(0, port, flags, log0))  # hosts the rendezvous store
        time.sleep(1)
        launched.append(node(1, port, flags, log1))
        return launched[-2:]


def descendants(pid):
    found, todo = [], [pid]
    while todo:
        parent = todo.pop()
        found.append(parent)
        for entry in filter(str.isdigit, os.listdir("/proc")):
            try:
                with open(f"/proc/{entry}/stat") as f:
                    if int(f.read().rsplit(")", 1)[1].split()[1]) == parent:
                        todo.append(int(entry))
            except OSError:  # exited meanwhile
                continue
    return found


def weights(out):
    return load_file(out / "model.safetensors")


def assert_same(a, b, atol):
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=atol, msg=key)


def test_two_nodes_equal_one_launcher_and_a_lost_node_resumes(tiny_bert_dir, tmp_path, launched):
    data = write_pairs(tmp_path / "train.jsonl", with_negatives=False)
    single = run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone",
                  *embed_flags(tiny_bert_dir, data, tmp_path / "single")], env=ENV, timeout=600)
    assert single.returncode == 0, single.stderr[-3000:]
    launchers = two_nodes(embed_flags(tiny_bert_dir, data, tmp_path / "nodes"), tmp_path, "nodes", launched)
    assert [p.wait(timeout=600) for p in launchers] == [0, 0]
    assert_same(weights(tmp_path / "nodes"), weights(tmp_path / "single"), atol=0)

    # lose node 1 (launcher and worker, SIGKILL) once a third of the run is checkpointed
    out = tmp_path / "lost"
    first, second = two_nodes(embed_flags(tiny_bert_dir, data, out), tmp_path, "lost", launched)
    deadline = time.monotonic() + 300
    while not (out / "checkpoint-40").exists():
        assert time.monotonic() < deadline and first.poll() is None and second.poll() is None
        time.sleep(0.02)
    for pid in descendants(second.pid):
        os.kill(pid, signal.SIGKILL)
    second.wait()
    assert first.wait(timeout=300) != 0  # the surviving node's worker fails on the broken collective
    assert not (out / "model.safetensors").exists()
    # the job restarts (both nodes, as a JobSet/PyTorchJob does) and resumes from the last complete checkpoint:
    # checkpoint-40, or -30 when the kill came while -40 was being written (then -40 is passed over)
    expected = last_complete_checkpoint(str(out), world_size=2)
    assert int(expected.rsplit("-", 1)[1]) >= 30
    launchers = two_nodes(embed_flags(tiny_bert_dir, data, out), tmp_path, "restart", launched)
    assert [p.wait(timeout=600) for p in launchers] == [0, 0]
    logs = (tmp_path / "restart-0.log").read_text() + (tmp_path / "restart-1.log").read_text()
    assert f"Resuming from {expected}" in logs
    assert_same(weights(out), weights(tmp_path / "nodes"), atol=1e-5)
