"""A minimal program with the same shape as housing/cifar/anomaly, used by the common/ tests.

Linear regression on a fixed synthetic dataset: small enough to run in a second, real enough to
exercise DDP, TrainBatches, exact evaluation, checkpoints and --resume end to end.
Run: ``torchrun --nproc_per_node=2 tests/toy_train.py --out-dir /tmp/toy``.
"""
from __future__ import annotations

import time

import torch

from common.checkpoint import full_model_state, save_checkpoint, training_state
from common.cli import check_shared_args, make_parser
from common.data import TrainBatches, eval_batches
from common.dist import distributed
from common.errors import UserError, run_main
from common.metrics import reduce_sums
from common.parallel import wrap_model
from common.report import RunRecorder
from common.resume import resume_from
from common.rng import seed_everything

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


def main() -> None:
    parser = make_parser("toy regression", epochs=4, batch_size=16, lr=0.05,
                         data_dir="data", out_dir="runs/toy")
    parser.add_argument("--fail-on-rank", type=int, default=None,
                        help="raise a UserError on this rank after setup (tests)")
    args = parser.parse_args()
    check_shared_args(args)
    with distributed(args.device, args.dist_timeout) as dist:
        if args.fail_on_rank == dist.rank:
            raise UserError(f"missing data file {args.data_dir}/toy.csv")
        seed_everything(args.seed)
        x_train, y_train, x_test, y_test = make_data()
        batches = TrainBatches([x_train, y_train], args.batch_size, dist, seed=args.seed)
        model = wrap_model(torch.nn.Sequential(torch.nn.Linear(N_FEATURES, 8), torch.nn.Tanh(),
                                               torch.nn.Linear(8, 1)), dist, args.strategy)
        optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)
        meta = {"program": "toy"}
        state = resume_from(args.resume, args.out_dir, dist, meta, model, optimizer)
        start_epoch = state["epoch"] + 1 if state else 0
        recorder = RunRecorder(args.out_dir, dist, start_epoch)
        start = time.time()
        for epoch in range(start_epoch, args.epochs):
            model.train()
            for step, (xb, yb) in enumerate(batches.epoch(epoch)):
                loss = torch.nn.functional.mse_loss(model(xb).squeeze(1), yb)
                optimizer.zero_grad(set_to_none=True)
                batches.global_mean(loss, step).backward()
                optimizer.step()
            recorder.log_epoch({"epoch": epoch, **evaluate(model, x_test, y_test, dist)})
            save_checkpoint(args.out_dir, training_state(model, optimizer, epoch, meta), dist)
        weights = full_model_state(model)  # complete on rank 0, the rank that writes the summary
        params = torch.cat([t.flatten() for t in weights.values()]) if weights else torch.empty(0)
        recorder.write_summary({"test": evaluate(model, x_test, y_test, dist),
                                "params": params.tolist(), "wall_time_s": time.time() - start},
                               args)


if __name__ == "__main__":
    run_main(main)
