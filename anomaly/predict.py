"""Score new flow records with a trained detector: one call, same features, same threshold.

    from anomaly.predict import predict_csv
    scored = predict_csv("new_flows.csv", "runs/anomaly/detector.pt")
    scored[["score", "is_attack"]]

The CSV may be a partition-layout file (header; ``label``/``attack_cat`` optional) or a raw
headerless ``UNSW-NB15_N.csv``. From the shell:
``python anomaly/predict.py new_flows.csv --detector runs/anomaly/detector.pt --out scored.csv``
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd
import torch

from anomaly.data import read_csv_file
from anomaly.features import FeatureTransform, transform_from_plain, transform_to_plain
from anomaly.model import PARTS, combined_score, make_detector, thresholds_tensor
from anomaly.scoring import SCORE_CHUNK, chunk_scores
from common.checkpoint import load_tensors_file
from common.dist import resolve_device
from common.errors import UserError, run_main
from common.files import torch_save_atomic, write_atomic

CPU = torch.device("cpu")


def write_detector(
    path: Path, net: torch.nn.Module, cfg, transform: FeatureTransform, thresholds: dict[str, float]
) -> None:
    """Everything ``anomaly.predict`` needs to score a new CSV, written atomically.

    Tensors and plain values only (the transform through ``transform_to_plain``), so
    ``anomaly.predict`` loads it without running code from the file.
    """
    torch_save_atomic(
        path,
        {
            "detector": cfg.detector,
            "model": net.state_dict(),
            "hidden": list(cfg.hidden),
            "classifier_hidden": list(cfg.classifier_hidden),
            "classifier_options": cfg.classifier_options,
            "transform": transform_to_plain(transform),
            "thresholds": thresholds,
            "score": cfg.score,
        },
    )


def load_detector(path: Path, device: torch.device = CPU) -> dict:
    """The bundle train.py wrote: detector kind, weights, widths, fitted transform, thresholds;
    the network and its thresholds on ``device``.

    Read without running code from the file (``common.checkpoint.load_tensors_file``): a
    detector holding pickled objects, as those of earlier versions did, is refused.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such detector; expected the detector.pt of an anomaly/train.py run")
    try:
        bundle = load_tensors_file(path)
    except UserError:
        raise
    except Exception as err:  # noqa: BLE001 - any failure to read means an unusable file
        raise UserError(f"{path}: not a readable detector ({type(err).__name__})") from None
    needed = ("detector", "model", "hidden", "classifier_hidden", "classifier_options", "transform", "thresholds")
    if not isinstance(bundle, dict) or any(k not in bundle for k in needed):
        lacks = ", ".join(k for k in needed if k not in bundle) if isinstance(bundle, dict) else "everything"
        raise UserError(
            f"{path}: not an anomaly detector of this version (lacks {lacks}); "
            "expected the detector.pt of an anomaly/train.py run: train again"
        )
    parts = PARTS.get(bundle["detector"], ())
    if not parts or set(bundle["thresholds"]) != set(parts):
        raise UserError(
            f"{path}: thresholds for {', '.join(bundle['thresholds']) or 'nothing'}, where a "
            f"{bundle['detector']} detector of this version has {', '.join(parts) or 'none'} "
            "(written by an earlier version); train again"
        )
    transform = transform_from_plain(bundle["transform"], str(path))
    bundle["transform"] = transform
    model = make_detector(
        bundle["detector"],
        transform,
        tuple(bundle["hidden"]),
        tuple(bundle["classifier_hidden"]),
        bundle["classifier_options"],
    )
    try:
        model.load_state_dict(bundle["model"])
    except RuntimeError as err:
        raise UserError(
            f"{path}: its weights do not fit a {bundle['detector']} detector ({str(err).splitlines()[0]})"
        ) from None
    bundle["net"] = model.double().eval().to(device)
    bundle["cut"] = thresholds_tensor(parts, bundle["thresholds"]).to(device)
    return bundle


def predict_frame(frame: pd.DataFrame, detector: dict) -> pd.DataFrame:
    """``frame`` plus ``score`` (score / validation threshold, the largest over the detector's
    parts) and ``is_attack`` (score >= 1)."""
    x = torch.from_numpy(detector["transform"].transform(frame)).double()
    device = detector["cut"].device
    # On the network's device, in train.py's chunks: a file holding a run's test rows gets the
    # very scores the run computed for them.
    with torch.no_grad():
        scores = (
            torch.cat(
                [
                    combined_score(
                        chunk_scores(detector["detector"], detector["net"], part.to(device)), detector["cut"]
                    ).cpu()
                    for part in x.split(SCORE_CHUNK)
                ]
            ).numpy()
            if len(x)
            else []
        )
    return frame.assign(score=scores, is_attack=scores >= 1.0)


def predict_csv(csv_path: Path | str, detector_path: Path | str, device: torch.device = CPU) -> pd.DataFrame:
    """Read, validate and score one CSV with a saved detector (its network on ``device``)."""
    frame = read_csv_file(Path(csv_path), need_labels=False)
    return predict_frame(frame, load_detector(Path(detector_path), device))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("csv", type=Path, help="flow records to score")
    parser.add_argument("--detector", type=Path, default=Path("runs/anomaly/detector.pt"))
    parser.add_argument("--out", type=Path, default=None, help="write the scored rows here (CSV)")
    parser.add_argument(
        "--device",
        default="auto",
        choices=("auto", "cpu", "cuda"),
        help="where the network scores: auto = the first GPU if there is one",
    )
    return parser.parse_args(argv)


def main() -> None:
    args = parse_args()
    scored = predict_csv(args.csv, args.detector, resolve_device(args.device, local_rank=0))
    flagged = int(scored["is_attack"].sum())
    print(f"{args.csv}: {len(scored)} rows, {flagged} flagged as attacks ({flagged / max(len(scored), 1):.1%})")
    if "label" in scored.columns:
        attacks = scored["label"] == 1
        print(f"  of the {int(attacks.sum())} labelled attacks, {int((scored['is_attack'] & attacks).sum())} flagged")
    if args.out is not None:
        write_atomic(args.out, lambda tmp: scored.to_csv(tmp, index=False))
        print(f"wrote {args.out}")


if __name__ == "__main__":
    run_main(main)
