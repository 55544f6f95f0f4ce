"""The rendezvous store a process group is built on, in a namespace of its own per attempt.

Why this exists: after a restart (``--max-restarts``) torchrun hands the workers the same
key-value store as before, still holding the previous attempt's peer addresses under the same
keys. A rank that starts faster than a peer reads the dead peer's address and the job hangs or
fails to connect (a known PyTorch problem; docs/reliability.md names its report). So each
attempt needs keys of its own, and ``common.dist.setup`` joins the process group through
``store_for_this_attempt``.

The namespace cannot come from ``TORCHELASTIC_RESTART_COUNT``: torchrun's agent counts it per
node, and only restarts after a *failure* count (torch/distributed/elastic/agent/server/api.py,
``_invoke_run``). When a worker dies on node A while node B's workers are busy outside a
collective (loading data, evaluating, writing a checkpoint), B's agent sees a healthy group and
a node waiting to rejoin, and restarts its workers as a *membership change*: A's workers get
count 1, B's count 0, and the two halves would wait for each other in different namespaces
until the timeout (tests/test_faults.py reproduces this). The rendezvous round, which the agents
do share, is not passed to the workers.

Instead the ranks agree on a generation through the store itself (``agree_on_generation``):
rank 0 draws a fresh number, every other rank acknowledges it, rank 0 confirms. A number left
over from an earlier attempt is never confirmed again, so no rank can settle on it.
"""

from __future__ import annotations

import datetime
import os
import time

import torch.distributed as tdist

POLL_S = 0.05  # how often a rank waiting on the store looks again


def store_for_this_attempt(rank: int, world_size: int, timeout: datetime.timedelta) -> tdist.Store:
    """The rendezvous key-value store at ``MASTER_ADDR:MASTER_PORT``, in a namespace that every
    rank of this attempt shares and no earlier attempt used (``agree_on_generation``).

    Hosted by torchrun's agent when it says so (``TORCHELASTIC_USE_AGENT_STORE``), else by rank
    0. Call on every rank, before ``init_process_group(store=...)``.
    """
    agent_hosts_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    store = tdist.TCPStore(
        host_name=os.environ["MASTER_ADDR"],
        port=int(os.environ["MASTER_PORT"]),
        world_size=world_size,
        is_master=rank == 0 and not agent_hosts_store,  # without torchrun's agent, rank 0 hosts
        timeout=timeout,
        multi_tenant=True,
    )
    generation = agree_on_generation(store, rank, world_size, timeout)
    return tdist.PrefixStore(f"torchdist/generation{generation}", store)


def agree_on_generation(store: tdist.Store, rank: int, world_size: int, timeout: datetime.timedelta) -> int:
    """A number all ranks of this attempt share and no earlier attempt used.

    Rank 0 is unique in an attempt, and every worker of the previous attempt is dead before
    any worker of the next one starts (torchrun stops them before it rendezvouses again). So:
    rank 0 takes the next number from a counter that survives in the store (``leader``); rank r
    acknowledges a leader number only if it is newer than the last one rank r acknowledged
    (``ack/r``, a leftover of the previous attempt is not); rank 0 confirms once every rank has
    acknowledged its number. A rank that acknowledged a stale number (its predecessor died
    before acknowledging it) waits for the confirmation that never comes, sees the new leader
    number instead, and acknowledges that one. Raises RuntimeError after ``timeout``.
    """
    deadline = time.monotonic() + timeout.total_seconds()

    def wait_a_little(what: str) -> None:
        if time.monotonic() > deadline:
            raise RuntimeError(
                f"rank {rank}: no agreement on the rendezvous namespace within {timeout.total_seconds():.0f}s ({what})"
            )
        time.sleep(POLL_S)

    if rank == 0:
        generation = store.add("torchdist/counter", 1)
        store.set("torchdist/leader", str(generation))
        for peer in range(1, world_size):
            while not (
                store.check([f"torchdist/ack/{peer}"]) and int(store.get(f"torchdist/ack/{peer}")) == generation
            ):
                wait_a_little(f"waiting for rank {peer}")
        store.set(f"torchdist/confirmed/{generation}", "1")
        return generation
    while True:
        while not store.check(["torchdist/leader"]):
            wait_a_little("waiting for rank 0")
        leader = int(store.get("torchdist/leader"))
        acked = int(store.get(f"torchdist/ack/{rank}")) if store.check([f"torchdist/ack/{rank}"]) else 0
        if leader <= acked:  # the previous attempt's number: our predecessor acknowledged it
            wait_a_little("waiting for rank 0")
            continue
        store.set(f"torchdist/ack/{rank}", str(leader))
        while True:
            if store.check([f"torchdist/confirmed/{leader}"]):
                return leader
            if int(store.get("torchdist/leader")) != leader:
                break  # we acknowledged a stale number; a new rank 0 has drawn its own
            wait_a_little("waiting for rank 0 to confirm")
