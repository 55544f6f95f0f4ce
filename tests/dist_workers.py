"""Functions run on the ranks of a real gloo process group by tests/test_distributed.py and others.

``spawn`` runs one on N ranks forked by tests/forkrun.py, the suite's one in-process launcher
(the programs' ranks start there too): each rank runs this file as ``__main__``, joins the group
through ``common.dist.distributed`` (the path torchrun's workers take), calls the function and
saves what it returned to ``out_dir/rank{r}.pt`` for the test to check.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path

import torch

from common.data import TrainBatches, eval_batches
from common.dist import DistInfo, distributed
from common.metrics import all_reduce_tensor, confusion_matrix, gather_tensors, reduce_sums
from common.parallel import wrap_model
from common.rng import seed_everything
from tests import forkrun


def spawn(worker: Callable, world_size: int, out_dir: Path, *args, timeout: float = 120) -> list[dict | None]:
    """Run ``worker(dist, *args)`` on ``world_size`` gloo ranks; return each rank's result (None
    for a rank that ended without one). Raises AssertionError when a rank fails. The ranks'
    stderr is written to this process's, where a test reads their error lines (``capfd``)."""
    from tests.launch import REPO, child_env, free_port

    out_dir = Path(out_dir)
    torch.save(args, out_dir / "args.pt")
    result = forkrun.fork_run(
        Path(__file__), [worker.__name__, str(out_dir)], world_size, child_env(), REPO, timeout, free_port()
    )
    sys.stderr.write(result.stderr)
    assert result.returncode == 0, f"{worker.__name__}: a rank failed:\n{result.stderr[-3000:]}"
    paths = [out_dir / f"rank{r}.pt" for r in range(world_size)]
    return [torch.load(p, weights_only=False) if p.exists() else None for p in paths]


# --- the data every worker agrees on -------------------------------------------------------


def regression_data(n: int = 96, features: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    x = torch.randn(n, features, generator=g)
    y = x @ torch.linspace(-1, 2, features) + 0.3 * torch.randn(n, generator=g)
    return x, y


def classification_data(n: int = 101, classes: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(11)
    logits = torch.randn(n, classes, generator=g)
    targets = torch.randint(0, classes, (n,), generator=g)
    return logits, targets


def mlp() -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))


# --- workers --------------------------------------------------------------------------------


def ddp_sgd_steps(dist: DistInfo, global_batch: int, steps: int, n: int = 96) -> dict:
    """Train an MLP for ``steps`` SGD steps with a global batch on ``n`` samples; return the
    final parameters."""
    seed_everything(0)
    x, y = regression_data(n)
    model = wrap_model(mlp(), dist)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    batches = TrainBatches([x, y], global_batch, dist, seed=3)
    for step, (xb, yb) in enumerate(batches.epoch(0)):
        if step == steps:
            break
        loss = torch.nn.functional.mse_loss(model(xb).squeeze(1), yb)
        optimizer.zero_grad()
        batches.global_mean(loss, step).backward()
        optimizer.step()
    return {"params": [p.detach().clone() for p in model.parameters()]}


def exact_metrics(dist: DistInfo, classes: int) -> dict:
    """Loss, RMSE, accuracy and confusion matrix over a 101-sample set, sharded across ranks."""
    logits, targets = classification_data(classes=classes)
    values = logits[:, 0] * 3.0  # a stand-in regression prediction ...
    truth = targets.double()  # ... against a stand-in target
    sums = {"ce": 0.0, "se": 0.0, "correct": 0, "n": 0}
    matrix = torch.zeros(classes, classes, dtype=torch.int64)
    for lb, tb, vb, yb in eval_batches([logits, targets, values, truth], 8, dist):
        sums["ce"] += torch.nn.functional.cross_entropy(lb.double(), tb, reduction="sum").item()
        sums["se"] += ((vb.double() - yb) ** 2).sum().item()
        sums["correct"] += (lb.argmax(1) == tb).sum().item()
        sums["n"] += len(tb)
        matrix += confusion_matrix(lb.argmax(1), tb, classes)
    totals = reduce_sums(sums, dist)
    local_scores = torch.cat([b[0][:, 1] for b in eval_batches([logits], 8, dist)] or [torch.empty(0)])
    return {
        "loss": totals["ce"] / totals["n"],
        "rmse": (totals["se"] / totals["n"]) ** 0.5,
        "accuracy": totals["correct"] / totals["n"],
        "n": totals["n"],
        "confusion": all_reduce_tensor(matrix, dist),
        "scores": gather_tensors(local_scores, dist),
    }


def sampled_indices(dist: DistInfo, n: int, global_batch: int, epochs: int) -> dict:
    """The sample indices each rank trains on, per epoch, gathered from all ranks."""
    batches = TrainBatches([torch.arange(n)], global_batch, dist, seed=5)
    per_epoch = []
    for epoch in range(epochs):
        local = torch.cat([b[0] for b in batches.epoch(epoch)])
        per_epoch.append(gather_tensors(local, dist))
    return {"per_epoch": per_epoch, "steps": len(batches)}


def collective_after_peer_exit(dist: DistInfo) -> dict:
    """Rank 1 leaves without joining the all-reduce; rank 0 must fail by timeout, not hang."""
    import time

    if dist.rank == 1:
        os._exit(0)
    start = time.time()
    try:
        reduce_sums({"x": 1.0}, dist)
        outcome = "completed"
    except Exception as err:  # noqa: BLE001 - the test inspects what happened
        outcome = type(err).__name__
    return {"outcome": outcome, "seconds": time.time() - start}


def fsdp_helpers(dist: DistInfo) -> dict:
    """What common.parallel promises for a sharded model, observed on each rank.

    Only the 102,656-parameter Linear (index 5) is big enough to be its own FSDP unit. Rank 1
    starts with wrong BatchNorm statistics: a forward must replace them with rank 0's (as DDP
    does). ``local_copy`` must be a plain module computing what the sharded one does;
    ``full_tensors`` then ``shard_like`` must give back each rank's own shards.
    """
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor

    from common.parallel import full_tensors, is_sharded, local_copy, shard_like

    seed_everything(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(6, 16),
        torch.nn.BatchNorm1d(16),
        torch.nn.Tanh(),
        torch.nn.Linear(16, 400),
        torch.nn.Tanh(),
        torch.nn.Linear(400, 256),
        torch.nn.Tanh(),
        torch.nn.Linear(256, 1),
    )
    if dist.rank == 1:
        model[1].running_mean.fill_(5.0)
    model = wrap_model(model, dist, "fsdp")
    x, _ = regression_data(8)
    model.eval()
    with torch.no_grad():
        sharded_out = model(x)
    plain = local_copy(model)
    with torch.no_grad():
        plain_out = plain.eval()(x)
    state = model.state_dict()
    full = full_tensors(state)
    back = shard_like(full, state)
    return {
        "sharded": is_sharded(model),
        "plain_sharded": is_sharded(plain),
        "units": [i for i, layer in enumerate(model) if isinstance(layer, FSDPModule)],
        "plain_has_dtensors": any(isinstance(p, DTensor) for p in plain.parameters()),
        "running_mean": model[1].running_mean.clone(),
        "outputs": (sharded_out, plain_out),
        "full": full,
        "full_shapes": {k: tuple(v.shape) for k, v in full.items()},
        "round_trip": all(
            torch.equal(back[k].to_local(), v.to_local()) if isinstance(v, DTensor) else torch.equal(back[k], v)
            for k, v in state.items()
        ),
    }


def disagreeing_start(dist: DistInfo) -> dict:
    """Rank 1 holds other weights than rank 0 (as when it resumed from no checkpoint): the
    agreement check must stop every rank, not let them train apart."""
    from common.run import check_ranks_agree

    torch.manual_seed(dist.rank)
    model = mlp()
    try:
        check_ranks_agree({"epoch": 3} if dist.rank == 0 else None, model, dist)
    except SystemExit as stop:
        return {"exit": stop.code}
    return {"exit": None}


def local_rank_zero_first(dist: DistInfo, scratch: str) -> dict:
    """Three ranks as two 'nodes' (local ranks 0, 1 | 0) run three scenarios of
    ``on_local_rank_zero_first``: all succeed; a first call (rank 0) fails; a later call (rank 1)
    fails. Each rank records when it ran ``fn`` and how the scenario ended."""
    import dataclasses
    import time

    from common.agree import on_local_rank_zero_first
    from common.errors import UserError

    node_view = dataclasses.replace(dist, local_rank=[0, 1, 0][dist.rank], local_world_size=2)
    out = {}
    for scenario, failing_rank in (("ok", None), ("first_fails", 0), ("later_fails", 1)):
        calls = []

        def fn(calls=calls, failing_rank=failing_rank, scenario=scenario) -> str:
            start = time.time()
            if node_view.local_rank == 0:
                time.sleep(0.5)  # a waiting rank that did not wait would start inside this
            calls.append((start, time.time()))
            if dist.rank == failing_rank:
                raise UserError(f"{scenario}: bad data seen by rank {dist.rank}")
            return f"{scenario} from rank {dist.rank}"

        try:
            result, code = on_local_rank_zero_first(fn, node_view), None
        except SystemExit as stop:
            result, code = None, stop.code
        out[scenario] = {"result": result, "exit": code, "calls": calls}
    return out


def agreed_data(dist: DistInfo) -> dict:
    """``agreed``: every rank loads; only rank 1's copy is bad, yet every rank stops."""
    from common.agree import agreed
    from common.errors import UserError

    def load() -> str:
        if dist.rank == 1:
            raise UserError(f"rank {dist.rank}'s copy of the data is bad")
        return "data"

    good = agreed(lambda: f"fine on rank {dist.rank}", dist)
    try:
        agreed(load, dist)
        code = None
    except SystemExit as stop:
        code = stop.code
    return {"good": good, "exit": code}


def nan_loss_on_rank_1(dist: DistInfo) -> str:
    """Steps 0-9 with a finite loss, except rank 1's at step 5; the epoch-end check's message."""
    from common.errors import NonFiniteLossError
    from common.finite import FiniteLossWatch

    watch = FiniteLossWatch(dist)
    for step in range(10):
        watch.update(torch.tensor(float("nan") if (dist.rank, step) == (1, 5) else 0.5), step)
    try:
        watch.check()
    except NonFiniteLossError as err:
        return str(err)
    return "no error"


if __name__ == "__main__":  # one rank of spawn()
    name, out = sys.argv[1], Path(sys.argv[2])
    with distributed("cpu", timeout_s=60) as dist:
        result = globals()[name](dist, *torch.load(out / "args.pt", weights_only=False))
    torch.save(result, out / f"rank{dist.rank}.pt")
