"""common.parallel's FSDP helpers on 2 gloo processes.

Each program's own test (test_housing, test_cifar, test_anomaly_train) checks the whole story
end to end: ``--strategy fsdp`` trains to DDP's weights, at half the memory per rank, and its
checkpoints resume under DDP at another world size and back.
"""

from __future__ import annotations

import torch

from tests import dist_workers as w


def test_sharded_model_units_buffers_copies_and_gathers(tmp_path):
    results = w.spawn(w.fsdp_helpers, 2, tmp_path)
    for rank in results:
        assert rank["sharded"] and not rank["plain_sharded"] and not rank["plain_has_dtensors"]
        assert rank["units"] == [5]  # the one block of >= MIN_UNIT_PARAMS; the rest is the root's
        # Rank 0's BatchNorm statistics everywhere (rank 1's 5.0 overwritten before forward).
        torch.testing.assert_close(rank["running_mean"], torch.zeros(16))
        torch.testing.assert_close(rank["outputs"][1], rank["outputs"][0])
        assert rank["full_shapes"]["0.weight"] == (16, 6) and rank["full_shapes"]["5.weight"] == (256, 400)
        assert rank["round_trip"]
        for name, tensor in rank["full"].items():  # both ranks gathered the same whole tensors
            torch.testing.assert_close(tensor, results[0]["full"][name], rtol=0, atol=0)
