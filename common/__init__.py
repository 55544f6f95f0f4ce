"""The shared library: the only package in this project that talks to torch.distributed.

Modules, one job each:
    dist        process-group setup/teardown -> DistInfo
    data        per-rank training batches and exact evaluation shards
    metrics     all-reduce of sums/counts, confusion matrices, gather of per-sample tensors
    checkpoint  atomic save on rank 0, load the newest good checkpoint, RNG capture
    cli         the arguments every program shares
    report      rank-0 logging, progress bars, metrics.jsonl / summary.json, plots
    errors      one-line user errors and the exit path that never hangs
"""
