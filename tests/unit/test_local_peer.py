"""``collab_core.local_peer``: two real local processes (gloo) as one peer, without any trainer or network.

The leader's ``contribute`` stands in for the collaborative optimizer: it changes the parameters and steps the
scheduler. The processes are started by ``torch.multiprocessing`` (no hivemind in them) and killed at the end, also
when one hangs.
"""

from __future__ import annotations

import os
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from collab_core.local_peer import LeaderOutcome, LocalGroup, LocalReplicas

JOIN_TIMEOUT = 120.0


def _worker(rank: int, init_file: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    torch.manual_seed(rank)  # the replicas start different: the leader's state must win
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.5**step)
    group = LocalGroup(2, rank == 0, torch.device("cpu"))
    replicas = LocalReplicas(group, opt, scheduler)
    seen_samples = []
    joined = group.run_on_leader(lambda: "membership", "join the collaboration")

    def contribute(peer_samples: int) -> LeaderOutcome:
        seen_samples.append(peer_samples)
        with torch.no_grad():
            for param in model.parameters():
                param.add_(1.0)
        scheduler.step()
        return LeaderOutcome(updated=True, changed=True, step=1, num_peers=3)

    outcome = replicas.step(3 if rank == 0 else 5, contribute if rank == 0 else None)
    result = {
        "outcome": outcome,
        "samples": seen_samples,
        "params": [p.detach().clone() for p in model.parameters()],
        "lr": opt.param_groups[0]["lr"],
        "last_epoch": scheduler.last_epoch,
        "joined": joined,
    }

    def fail_to_join() -> str:
        raise ConnectionError("no peers")

    try:
        group.run_on_leader(fail_to_join, "join the collaboration")
    except (ConnectionError, RuntimeError) as error:
        result["join_error"] = f"{type(error).__name__}: {error}"

    def fail(_peer_samples: int) -> LeaderOutcome:
        raise ValueError("the leader broke")

    try:
        replicas.step(1, fail if rank == 0 else None)
    except (ValueError, RuntimeError) as error:
        result["error"] = f"{type(error).__name__}: {error}"
    torch.save(result, out)
    dist.destroy_process_group()


def test_followers_receive_the_leaders_state_and_its_failures(tmp_path):
    outs = [str(tmp_path / f"rank{rank}.pt") for rank in range(2)]
    context = mp.start_processes(
        _worker_entry, args=(str(tmp_path / "init"), outs), nprocs=2, join=False, start_method="spawn"
    )
    try:
        deadline = time.monotonic() + JOIN_TIMEOUT
        while not context.join(timeout=1.0):
            assert time.monotonic() < deadline, "the local processes did not finish"
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()
            process.join(5)
    leader, follower = (torch.load(out, weights_only=False) for out in outs)
    assert leader["samples"] == [8]  # the samples of both processes, reported once by the leader
    assert leader["outcome"] == follower["outcome"] == LeaderOutcome(True, True, 1, 3)
    for a, b in zip(leader["params"], follower["params"], strict=True):
        assert torch.equal(a, b)
    assert follower["lr"] == leader["lr"] == 0.05 and follower["last_epoch"] == leader["last_epoch"] == 1
    assert leader["joined"] == "membership" and follower["joined"] is None  # run_on_leader: the leader's result
    assert leader["join_error"] == "ConnectionError: no peers"
    assert follower["join_error"] == (
        "RuntimeError: the main process of this peer could not join the collaboration: ConnectionError: no peers"
    )
    assert leader["error"] == "ValueError: the leader broke"
    assert follower["error"].startswith("RuntimeError: the main process of this peer failed")


def _worker_entry(rank: int, init_file: str, outs: list[str]) -> None:
    _worker(rank, init_file, outs[rank])
    # The results are saved and the process group destroyed. Leave without the interpreter's teardown: after the
    # failure step, a worker aborted at exit in about 1 run in 5 (SIGABRT, "terminate called without an active
    # exception", no Python frame left: a C++ destructor of torch 2.13's gloo, not reproduced without the failure
    # step), which would fail this test of the protocol for a reason outside it.
    os._exit(0)
