"""Distributed ZO under torchrun (2 CPU processes, gloo): the same run as one process, only scalars exchanged."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import zotune
from zotune.cli import main
from zotune.distributed import Cluster

SRC = Path(zotune.__file__).resolve().parents[1]


def torchrun(*args: str, timeout: int = 900) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *args]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the ranks too, not only the launcher
        out, err = proc.communicate()
        raise AssertionError(f"torchrun timed out after {timeout} s:\n{err[-3000:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def train_args(tiny, out, *extra):
    return ["train", "--model", str(tiny), "--task", "rotten-tomatoes", "--steps", "6", "--train-size", "40",
            "--dev-size", "8", "--batch-size", "5", "--lr", "0.05", "--method", "mezo-lora", "--threads", "1",
            "--progress", "false", "--check-sync-every", "2", "--dtype", "float32",  # as the in-process runs (conftest)
            "--output-dir", str(out), *extra]


def tensors(run):
    return load_file(next((run / "adapter").glob("*.safetensors")))


def jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


# the names of this process's native threads (Linux), gloo's among them while a group lives
THREAD_NAMES = textwrap.dedent("""
    import os

    def thread_names():
        names = []
        for t in os.listdir("/proc/self/task"):
            try:
                with open(f"/proc/self/task/{t}/comm") as f:
                    names.append(f.read().strip())
            except OSError:  # the thread ended between the listing and the read (ENOENT, or ESRCH): not alive
                pass
        return sorted(names)
""")

WORKER = THREAD_NAMES + textwrap.dedent("""
    import sys, torch, torch.distributed as dist
    from zotune.cli import main
    from zotune.distributed import Cluster, import_before_group
    from zotune.errors import ZOError

    # a group this script owns, as a user's own launcher would: the imports first, so the group is freeable
    import_before_group()
    dist.init_process_group("gloo")
    assert main(sys.argv[2:]) == 0

    rank = dist.get_rank()
    # each rank reports into its own file: two ranks printing to one pipe may interleave
    log = open(sys.argv[1] + f".{rank}", "w")
    say = lambda *a: print(*a, file=log, flush=True)
    c = Cluster(rank, 2, "query", check_sync_every=1)
    # 3 queries over 2 ranks: rank 0 has queries 0 and 2, rank 1 has query 1 (and pads)
    mine = [(q, 10.0 * q, float(q)) for q in range(rank, 3, 2)]
    say(f"rank {rank} gathered", c._gather_queries(mine, 3))
    c.check_sync(1, {"w": torch.ones(3)})
    say(f"rank {rank} same params pass")
    try:
        c.check_sync(2, {"w": torch.ones(3) + rank * 1e-3})
    except ZOError as exc:
        say(f"rank {rank} caught:", exc)
    dist.destroy_process_group()
    say(f"rank {rank} threads after destroy:", " ".join(thread_names()))
""")

# `zotune train` as torchrun starts it, creating and destroying its own process group; at exit
# each rank writes which native threads are still alive (gloo's must be gone by then)
CLI = THREAD_NAMES + textwrap.dedent("""
    import atexit, os, sys
    from zotune.cli import main

    def threads_at_exit():
        names = " ".join(thread_names())  # before the file is truncated, so an error cannot leave it empty
        with open(sys.argv[1] + "." + os.environ["RANK"], "w") as f:
            f.write(names)

    atexit.register(threads_at_exit)
    sys.exit(main(sys.argv[2:]))
""")


@pytest.fixture(scope="module")
def runs(tiny_llama, tmp_path_factory):
    """One process and two ranks: `zotune train` data-parallel, and a script that runs query-parallel
    (q = 2) and the exchanges in a group of its own."""
    tmp = tmp_path_factory.mktemp("dist")
    (tmp / "cli.py").write_text(CLI)
    (tmp / "worker.py").write_text(WORKER)
    cli = torchrun(str(tmp / "cli.py"), str(tmp / "exit"), *train_args(tiny_llama, tmp / "data2", "--parallel", "data"))
    assert cli.returncode == 0, cli.stderr[-3000:]
    (tmp / "cli.stderr").write_text(cli.stderr)  # an atexit hook's error shows only here, with exit code 0
    launch = torchrun(str(tmp / "worker.py"), str(tmp / "ranks"),
                      *train_args(tiny_llama, tmp / "query2", "--queries", "2", "--parallel", "query"))
    assert launch.returncode == 0, launch.stderr[-3000:]
    assert main(train_args(tiny_llama, tmp / "data1")) == 0
    assert main(train_args(tiny_llama, tmp / "query1", "--queries", "2")) == 0
    return tmp, cli.stdout + launch.stdout


def test_data_parallel_run_matches_the_one_process_run_on_the_full_batch(runs, capsys):
    # 2 ranks share each batch of 5 (3 + 2 examples); the loss is the full batch's mean.
    tmp, stdout = runs
    assert stdout.count("dev accuracy") == 2  # two runs, reported by rank 0 only
    a, b = tensors(tmp / "data1"), tensors(tmp / "data2")
    assert a.keys() == b.keys()
    diff = max(float((a[k] - b[k]).abs().max()) for k in a)
    scale = max(float(a[k].abs().max()) for k in a)
    with capsys.disabled():
        print(f"\ndata-parallel 2 ranks vs 1 process: max |adapter diff| = {diff:.3g} (max |adapter value| {scale:.3g})")
    assert diff < 1e-5
    g1 = [r["g"][0] for r in jsonl(tmp / "data1" / "trajectory.jsonl")]
    g2 = [r["g"][0] for r in jsonl(tmp / "data2" / "trajectory.jsonl")]
    assert len(g2) == 6 and max(abs(x - y) for x, y in zip(g1, g2)) < 1e-3 * max(map(abs, g1))
    steps = [r for r in jsonl(tmp / "data2" / "metrics.jsonl") if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4, 5, 6]  # written once, by rank 0
    # per step: 2 losses x 2 ranks x 8 bytes, plus a 2 x 8-byte checksum exchange every 2 steps
    # (step 1 also carries the start-of-run checksum)
    assert [r["comm_bytes"] for r in steps] == [48, 48, 32, 48, 32, 48]


def test_query_parallel_run_is_the_one_process_run_bit_for_bit(runs, capsys):
    # q = 2: rank 0 evaluates query 0 and rank 1 query 1 on the whole batch; all apply both.
    tmp, _ = runs
    a, b = tensors(tmp / "query1"), tensors(tmp / "query2")
    diff = max(float((a[k] - b[k]).abs().max()) for k in a)
    with capsys.disabled():
        print(f"\nquery-parallel q=2, 2 ranks vs 1 process: max |adapter diff| = {diff:.3g}")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (tmp / "query1" / "trajectory.jsonl").read_text() == (tmp / "query2" / "trajectory.jsonl").read_text()
    steps = [r for r in jsonl(tmp / "query2" / "metrics.jsonl") if "loss" in r]
    assert {r["parallel"] for r in steps} == {"query"} and steps[2]["comm_bytes"] == 2 * 3 * 8  # (q, g, loss)


def test_query_gather_pads_uneven_ranks_and_a_parameter_mismatch_stops_every_rank(runs):
    tmp, _ = runs
    for rank in (0, 1):
        out = (tmp / f"ranks.{rank}").read_text()
        assert f"rank {rank} gathered [(0, 0.0, 0.0), (1, 10.0, 1.0), (2, 20.0, 2.0)]" in out
        assert f"rank {rank} same params pass" in out
        assert f"rank {rank} caught: parameters differ across ranks after step 2" in out


def test_destroying_the_group_stops_gloo_threads_before_the_process_exits(runs):
    # A group that outlives destroy_process_group (pinned by an import made after it existed)
    # leaves gloo's threads running into interpreter exit, where the process now and then aborts.
    tmp, _ = runs
    for rank in (0, 1):
        assert (tmp / f"exit.{rank}").exists(), (tmp / "cli.stderr").read_text()[-3000:]
        at_exit = (tmp / f"exit.{rank}").read_text()  # zotune train, which owned its group
        after = (tmp / f"ranks.{rank}").read_text().split("threads after destroy:")[1]  # the script's group
        assert at_exit and "gloo" not in at_exit and after.strip() and "gloo" not in after


def test_data_shards_are_contiguous_slices_whose_union_is_the_batch():
    batch = [7, 3, 9, 1, 4]
    shards = [Cluster(r, 2, "data").shard(batch) for r in range(2)]
    assert shards == [[7, 3, 9], [1, 4]]
    assert [Cluster(r, 3, "data").shard(batch) for r in range(3)] == [[7, 3], [9, 1], [4]]
    assert Cluster(1, 2, "query").shard(batch) == batch  # query-parallel: every rank sees the whole batch
    assert Cluster().shard(batch) == batch and Cluster().step_stats() == {}
