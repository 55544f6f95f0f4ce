"""The shared library: the only package in this project that talks to torch.distributed.

Modules, one job each:
    dist        process-group setup/teardown -> DistInfo; errors agreed across ranks;
                on_local_rank_zero_first (one process per node downloads/decodes first)
    data        per-rank training batches and exact evaluation shards
    metrics     all-reduce of sums/counts, confusion matrices, gather of per-sample tensors
    parallel    wrap_model (DDP or FSDP2), local_copy, full_tensors/shard_like, memory per rank
    checkpoint  atomic save on rank 0, load the newest good checkpoint, RNG capture
    resume      --resume: the one checkpoint every rank resumes from, loaded and checked
    safe_state  fitted scikit-learn objects as plain data, rebuilt from trusted types only
    preempt     SIGTERM/SIGUSR1: finish the step, agree, checkpoint, exit 75
    rng         seeding, RNG capture and restore
    cli         the arguments every program shares
    config      RunConfig: the fields every program's Config shares, validated once
    evaluation  --eval-only: the agreed checkpoint, its saved config, eval.json
    report      rank-0 logging, progress bars, metrics.jsonl / summary.json, TensorBoard, plots
    errors      one-line user errors and the exit path that never hangs
    files       atomic writes (temp file, fsync, rename) and checksum-verified downloads
    figures     matplotlib on the Agg backend, figures saved atomically
    launch      start a program as python or torchrun from another (bench, tests)
"""
