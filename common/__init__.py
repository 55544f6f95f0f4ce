"""The shared library: the only package in this project that talks to torch.distributed.

Modules, one job each:
    dist        process-group setup/teardown -> DistInfo (the one reader of torchrun's environment)
    rendezvous  the store the process group is built on, in a namespace per restart attempt
    agree       one verdict for all ranks: errors agreed across ranks, equal-everywhere checks,
                on_local_rank_zero_first (one process per node downloads/decodes first)
    data        per-rank training batches and exact evaluation shards
    metrics     all-reduce of sums/counts, confusion matrices, gather of per-sample tensors
    parallel    wrap_model (DDP or FSDP2), local_copy, full_tensors/shard_like, memory per rank,
                sum_over_ranks (a differentiable sum over the global batch)
    run         Run: one training run's lifecycle (run directory, agreed resume, checkpoints,
                pre-emption, records) and --eval-only
    checkpoint  the checkpoint format: what a checkpoint holds, atomic save on rank 0, safe loading
    safe_state  fitted scikit-learn objects as plain data, rebuilt from trusted types only
    preempt     SIGTERM/SIGUSR1: finish the step, agree, checkpoint, exit 75
    rng         seeding, RNG capture and restore
    config      the flags every program shares (make_parser) and RunConfig, validated once
    console     rank-0 logging, progress bars, optional extras that only warn on failure
    records     the run directory's metrics.jsonl / summary.json / result files (RunRecorder)
    tensorboard --tensorboard: the optional writer, a metrics row as scalars
    errors      one-line user errors and the exit path that never hangs
    files       atomic writes (temp file, fsync, rename) and checksum-verified downloads
    figures     matplotlib on the Agg backend, figures saved atomically, per-epoch curves
"""
