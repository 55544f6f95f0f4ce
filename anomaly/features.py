"""Flow records -> a numeric matrix: engineered features, log1p, one-hot, scaling, PCA.

Everything is fitted on training rows only and kept in one scikit-learn ``Pipeline``
(``build_transform``), which is stored in the checkpoint and ``detector.pt`` as plain data
(``transform_to_plain``: arrays and names, loaded without running code) so that a new CSV is
scored with one call (``anomaly.predict.predict_csv``).

Steps, each suggested by ``explore.py``'s report on the 82,332-row partition:
- engineered columns (``engineer``): bytes per packet in each direction, and log ratios of
  source to destination bytes, packets and load (attacks are much more one-sided than normal
  flows), plus a flag for "no reply at all" (``dpkts == 0``);
- how often the exact byte counts (and the packets/bytes tuple) occur in normal training flows
  (``CountEncoder``): scans and floods repeat sizes normal traffic rarely shows;
- ``log1p`` on heavy-tailed non-negative columns (``SkewedLog1p`` picks those whose skew on the
  training data exceeds ``skew_threshold``; 30 of 39 raw counts are skewed above 2);
- the low-cardinality numeric codes ``sttl``, ``dttl``, ``swin``, ``dwin``, ``ct_state_ttl``
  (a handful of distinct values whose meaning is categorical: an initial TTL of 254 vs 62 vs 31
  says which host stack sent the flow) are one-hot encoded, like ``proto``, ``service`` and
  ``state``; levels seen fewer than ``min_frequency`` times are folded into one "infrequent"
  level, and unseen levels at inference map there too;
- ``StandardScaler`` on the numeric block;
- ``PCA`` keeping the fewest components that explain ``pca_variance`` of the variance
  (``project``/``reconstruct`` give the rotation, so a model can work in PCA space while the
  anomaly score is still measured on every scaled feature, residual included).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch
from sklearn.base import BaseEstimator, TransformerMixin
from sklearn.compose import ColumnTransformer
from sklearn.decomposition import PCA
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import FunctionTransformer, OneHotEncoder, StandardScaler

from anomaly.data import CATEGORICAL, NUMERIC, PARTITION_ONLY, Splits
from common.errors import UserError
from common.safe_state import rebuild, to_plain

# Numeric codes with a few distinct values that behave like categories.
CODES = ("sttl", "dttl", "swin", "dwin", "ct_state_ttl")
ENGINEERED = ("sbytes_per_pkt", "dbytes_per_pkt", "log_bytes_ratio", "log_pkts_ratio", "log_load_ratio", "no_reply")
# Exact values whose frequency among normal training flows is a feature (see CountEncoder).
COUNTED = {
    "count_sbytes": ("sbytes",),
    "count_dbytes": ("dbytes",),
    "count_sizes": ("spkts", "dpkts", "sbytes", "dbytes"),
}


def engineer(frame: pd.DataFrame) -> pd.DataFrame:
    """Add the engineered columns to a copy of ``frame`` (pure function of one row at a time)."""
    out = frame.copy()
    out["sbytes_per_pkt"] = frame["sbytes"] / frame["spkts"].clip(lower=1)
    out["dbytes_per_pkt"] = frame["dbytes"] / frame["dpkts"].clip(lower=1)
    out["log_bytes_ratio"] = np.log1p(frame["sbytes"]) - np.log1p(frame["dbytes"])
    out["log_pkts_ratio"] = np.log1p(frame["spkts"]) - np.log1p(frame["dpkts"])
    out["log_load_ratio"] = np.log1p(frame["sload"]) - np.log1p(frame["dload"])
    out["no_reply"] = (frame["dpkts"] == 0).astype(np.float64)
    return out


class CountEncoder(TransformerMixin, BaseEstimator):
    """Adds ``log1p(how many fitted rows share this exact value)`` for each key in ``COUNTED``.

    Fitted on normal training flows, it says "this exact size was seen N times in normal
    traffic". Normal traffic is varied while scans and floods repeat a few exact sizes that normal
    traffic rarely shows. ``fit_transform`` leaves each training row out of its own count
    (leave-one-out, like scikit-learn's ``TargetEncoder`` cross-fitting), so a training row and a
    new row with the same value frequencies get the same feature.
    """

    def fit(self, x: pd.DataFrame, y=None) -> CountEncoder:
        self.counts_ = {name: self._keys(x, cols).value_counts() for name, cols in COUNTED.items()}
        return self

    @staticmethod
    def _keys(x: pd.DataFrame, cols: tuple[str, ...]) -> pd.Series:
        return pd.util.hash_pandas_object(x[list(cols)], index=False)

    def _encode(self, x: pd.DataFrame, leave_one_out: bool) -> pd.DataFrame:
        out = x.copy()
        for name, cols in COUNTED.items():
            counts = self._keys(x, cols).map(self.counts_[name]).fillna(0).to_numpy(np.float64)
            out[name] = np.log1p(counts - 1 if leave_one_out else counts)
        return out

    def transform(self, x: pd.DataFrame) -> pd.DataFrame:
        return self._encode(x, leave_one_out=False)

    def fit_transform(self, x: pd.DataFrame, y=None) -> pd.DataFrame:
        return self.fit(x)._encode(x, leave_one_out=True)


class SkewedLog1p(TransformerMixin, BaseEstimator):
    """``log1p`` on the columns that are non-negative and heavy-tailed in the training data."""

    def __init__(self, skew_threshold: float = 2.0) -> None:
        self.skew_threshold = skew_threshold

    def fit(self, x: pd.DataFrame, y=None) -> SkewedLog1p:
        frame = pd.DataFrame(x)
        skew = frame.skew()
        self.log_columns_ = [c for c in frame.columns if frame[c].min() >= 0 and skew[c] > self.skew_threshold]
        self.feature_names_in_ = np.asarray(frame.columns, dtype=object)
        return self

    def transform(self, x: pd.DataFrame) -> pd.DataFrame:
        frame = pd.DataFrame(x).copy()
        for c in self.log_columns_:
            # clip: a new file may hold a negative value where training had none.
            frame[c] = np.log1p(frame[c].clip(lower=0))
        return frame

    def get_feature_names_out(self, input_features=None) -> np.ndarray:
        return self.feature_names_in_


def input_columns(frame: pd.DataFrame) -> tuple[list[str], list[str]]:
    """(numeric, categorical) raw columns the transform reads, given what ``frame`` holds."""
    numeric = [c for c in (*NUMERIC, *PARTITION_ONLY) if c in frame.columns and c not in CODES]
    return numeric + list(ENGINEERED) + list(COUNTED), [*CATEGORICAL, *CODES]


def build_transform(frame: pd.DataFrame, min_frequency: int = 20, skew_threshold: float = 2.0) -> Pipeline:
    """An unfitted pipeline for the columns ``frame`` has (``rate`` exists only in partitions)."""
    numeric, categorical = input_columns(frame)
    columns = ColumnTransformer(
        [
            ("numeric", Pipeline([("log1p", SkewedLog1p(skew_threshold)), ("scale", StandardScaler())]), numeric),
            (
                "categorical",
                OneHotEncoder(
                    min_frequency=min_frequency,
                    handle_unknown="infrequent_if_exist",
                    sparse_output=False,
                    dtype=np.float64,
                ),
                categorical,
            ),
        ],
        verbose_feature_names_out=False,
    )
    return Pipeline([("engineer", FunctionTransformer(engineer)), ("counts", CountEncoder()), ("columns", columns)])


def prepare(frame: pd.DataFrame) -> pd.DataFrame:
    """The columns the transform needs, codes as strings so the encoder treats them as levels."""
    numeric, categorical = input_columns(frame)
    raw_numeric = [c for c in numeric if c not in ENGINEERED and c not in COUNTED]
    out = frame[raw_numeric].astype(np.float64)
    for c in categorical:
        values = frame[c]
        out[c] = values.astype(str) if c in CATEGORICAL else values.map(lambda v: f"{v:g}")
    return out


class FeatureTransform:
    """The fitted feature pipeline plus PCA; stored as plain data, applied identically at inference."""

    def __init__(self, min_frequency: int = 20, skew_threshold: float = 2.0, pca_variance: float = 0.999) -> None:
        self.min_frequency = min_frequency
        self.skew_threshold = skew_threshold
        self.pca_variance = pca_variance

    def fit_transform(self, frame: pd.DataFrame) -> np.ndarray:
        """Fit on training rows only; return their features (counts leave-one-out)."""
        prepared = prepare(frame)
        self.pipeline = build_transform(prepared, self.min_frequency, self.skew_threshold)
        x = self.pipeline.fit_transform(prepared)
        self.feature_names = list(self.pipeline.named_steps["columns"].get_feature_names_out())
        self.pca = PCA(n_components=self.pca_variance, svd_solver="full", random_state=0).fit(x)
        self.input_names = list(prepared.columns)
        return np.ascontiguousarray(x, dtype=np.float32)

    def fit(self, frame: pd.DataFrame) -> FeatureTransform:
        self.fit_transform(frame)
        return self

    def transform(self, frame: pd.DataFrame) -> np.ndarray:
        """Scaled features (n_rows, n_features) as float32, before PCA."""
        missing = [c for c in self.input_names if c not in frame.columns]
        if missing:
            raise UserError(
                f"input lacks column(s) {', '.join(missing)} that this detector was "
                "trained with; expected the same layout as the training files"
            )
        return np.ascontiguousarray(self.pipeline.transform(prepare(frame)), dtype=np.float32)

    @property
    def n_features(self) -> int:
        return len(self.feature_names)

    @property
    def n_components(self) -> int:
        return int(self.pca.n_components_)

    def indicator_columns(self) -> list[int]:
        """The one-hot columns (0/1 before scaling): they follow the numeric block."""
        numeric = self.pipeline.named_steps["columns"].named_transformers_["numeric"]
        n_numeric = len(numeric.named_steps["scale"].mean_)
        return list(range(n_numeric, self.n_features))

    def pca_tensors(self) -> tuple[np.ndarray, np.ndarray]:
        """``(mean, components)``: ``z = (x - mean) @ components.T``, ``x ≈ z @ components + mean``."""
        return self.pca.mean_.astype(np.float32), self.pca.components_.astype(np.float32)

    def describe(self) -> dict:
        """What was fitted, for summary.json and the README."""
        log_columns = (
            self.pipeline.named_steps["columns"].named_transformers_["numeric"].named_steps["log1p"].log_columns_
        )
        return {
            "n_features": self.n_features,
            "pca_components": self.n_components,
            "pca_variance": self.pca_variance,
            "pca_explained": float(self.pca.explained_variance_ratio_.sum()),
            "log1p_columns": list(log_columns),
            "engineered": list(ENGINEERED) + list(COUNTED),
        }


# Everything a fitted FeatureTransform is built from: the only classes and functions that loading
# one from a checkpoint or detector.pt may call (common/safe_state.py).
TRUSTED = (
    FeatureTransform,
    Pipeline,
    FunctionTransformer,
    engineer,
    CountEncoder,
    ColumnTransformer,
    SkewedLog1p,
    StandardScaler,
    OneHotEncoder,
    PCA,
)


def transform_to_plain(transform: FeatureTransform) -> dict:
    """The fitted transform as tensors and plain values, for detector.pt and checkpoints."""
    return to_plain(transform, TRUSTED)


def transform_from_plain(tree: dict, where: str) -> FeatureTransform:
    """Inverse of ``transform_to_plain``; UserError naming ``where`` if it is not one."""
    return rebuild(
        tree, TRUSTED, FeatureTransform, where, "feature transform", "re-run anomaly/train.py to write a new detector"
    )


def make_features(
    splits: Splits, min_frequency: int, pca_variance: float, fitted: FeatureTransform | None = None
) -> tuple[FeatureTransform, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Fit the transform on the normal training rows; features and labels of every split.

    ``fitted``: the transform saved with a run (``--eval-only``), used as it is: the run's
    weights were trained on its features, so nothing is fitted again.
    """
    normal = (splits.train["label"] == 0).to_numpy()
    if fitted is None:
        transform = FeatureTransform(min_frequency, pca_variance=pca_variance)
        x_normal = transform.fit_transform(splits.train[normal])  # frequencies leave-one-out
    else:
        transform, x_normal = fitted, fitted.transform(splits.train[normal])
    x_train = transform.transform(splits.train)
    x_train[normal] = x_normal  # every training row's frequencies count the *other* rows only
    x = {
        "train": torch.from_numpy(x_train),
        "train_normal": torch.from_numpy(x_normal),
        "val": torch.from_numpy(transform.transform(splits.val)),
        "test": torch.from_numpy(transform.transform(splits.test)),
    }
    y = {name: torch.tensor(getattr(splits, name)["label"].to_numpy()) for name in ("train", "val", "test")}
    y["train_normal"] = torch.zeros(len(x_normal), dtype=y["train"].dtype)
    return transform, x, y
