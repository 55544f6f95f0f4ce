"""A minimal program with the same shape as housing/cifar/anomaly, used by the common/ tests.

Linear regression on a fixed synthetic dataset: small enough to run in a second, real enough to
exercise DDP, TrainBatches, exact evaluation, checkpoints and --resume end to end.
Run: ``torchrun --nproc_per_node=2 tests/toy_train.py --out-dir /tmp/toy``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch.nn.functional import mse_loss

from common.checkpoint import full_model_state
from common.config import RunConfig, make_parser
from common.data import TrainBatches, eval_batches
from common.dist import distributed
from common.errors import UserError, run_main
from common.metrics import reduce_sums
from common.parallel import wrap_model
from common.rng import seed_everything
from common.run import Run, Training

N_TRAIN, N_TEST, N_FEATURES = 96, 101, 5


def make_data(seed: int = 1234) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N_TRAIN + N_TEST, N_FEATURES, generator=g)
    w = torch.arange(1.0, N_FEATURES + 1)
    y = x @ w + 0.1 * torch.randn(N_TRAIN + N_TEST, generator=g)
    return x[:N_TRAIN], y[:N_TRAIN], x[N_TRAIN:], y[N_TRAIN:]


def evaluate(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, dist) -> dict[str, float]:
    model.eval()
    sums = {"se": 0.0, "n": 0}
    with torch.no_grad():
        for xb, yb in eval_batches([x, y], 16, dist):
            sums["se"] += ((model(xb).squeeze(1) - yb) ** 2).double().sum().item()
            sums["n"] += len(yb)
    totals = reduce_sums(sums, dist)
    return {"mse": totals["se"] / totals["n"], "n": totals["n"]}


@dataclass(frozen=True, kw_only=True)
class Config(RunConfig):
    PROGRAM: ClassVar[str] = "toy"
    # No schedule depends on the number of epochs: a resumed run may go on for more.
    RESUME_OPTIONS: ClassVar[tuple[str, ...]] = ("epochs", "fail_on_rank")

    fail_on_rank: int | None = None


def main() -> None:
    parser = make_parser(
        "toy regression", {"epochs": 4, "batch_size": 16, "lr": 0.05, "data_dir": "data", "out_dir": "runs/toy"}
    )
    parser.add_argument(
        "--fail-on-rank", type=int, default=None, help="raise a UserError on this rank after setup (tests)"
    )
    cfg = Config.from_args(parser.parse_args())
    with distributed(cfg.device, cfg.dist_timeout) as dist:
        if cfg.fail_on_rank == dist.rank:
            raise UserError(f"missing data file {cfg.data_dir}/toy.csv")
        seed_everything(cfg.seed)
        x_train, y_train, x_test, y_test = make_data()
        batches = TrainBatches([x_train, y_train], cfg.batch_size, dist, seed=cfg.seed)
        model = wrap_model(
            torch.nn.Sequential(torch.nn.Linear(N_FEATURES, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1)),
            dist,
            cfg.strategy,
        )
        optimizer = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=0.9)
        training = Training(model, optimizer, None, batches, lambda out, batch: mse_loss(out.squeeze(1), batch[1]))
        run = Run(cfg, dist, {"program": "toy"}, training)
        start = time.time()
        for progress in run.epochs():
            model.train()
            for step, (xb, yb) in enumerate(batches.epoch(progress.epoch)):
                training.step(training.loss(model(xb), (xb, yb)), step)
            run.log_epoch({"epoch": progress.epoch, **evaluate(model, x_test, y_test, dist)})
            run.save(progress.epoch)
        weights = full_model_state(model)  # complete on rank 0, the rank that writes the summary
        params = torch.cat([t.flatten() for t in weights.values()]) if weights else torch.empty(0)
        run.write_summary(
            {
                "test": evaluate(model, x_test, y_test, dist),
                "params": params.tolist(),
                "wall_time_s": time.time() - start,
            }
        )


if __name__ == "__main__":
    run_main(main)
