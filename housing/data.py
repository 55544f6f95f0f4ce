"""California housing: raw ``housing.csv`` -> validated frame -> fixed splits -> fitted features.

The file is the Kaggle / "Hands-On Machine Learning" ``housing.csv`` (20,640 block groups of the
1990 census): 9 feature columns, the target ``median_house_value`` in dollars, the categorical
``ocean_proximity``, and 207 missing ``total_bedrooms``.

Splits. The test split is exactly ``train_test_split(rows, test_size=0.2, random_state=42)`` on
the raw rows, the split every published baseline on this file uses. The remaining 80% is cut
once more, seeded by ``--seed``, into training and validation (early stopping, model choice).

The capped target. Prices were top-coded at $500,001 (965 rows, 4.7%): the true value is
"$500,001 or more". We keep those rows everywhere (the test split must stay the standard one,
and dropping them from training would teach the net that no block is that expensive), train on
``log(price)``, and clip every prediction to the observed range [$14,999, $500,001]: no true
label lies above the cap, so clipping can only shrink an error. Metrics on the capped rows are
therefore errors against the recorded (capped) value, as in every baseline we compare with.

Features. One scikit-learn ``ColumnTransformer`` fitted on the training split only; each of its
parts is a named *feature group* (one-hot ``ocean_proximity`` is one group, the location
clusters another), which is the unit feature selection keeps or drops.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from sklearn.base import BaseEstimator, TransformerMixin
from sklearn.cluster import KMeans
from sklearn.compose import ColumnTransformer
from sklearn.impute import SimpleImputer
from sklearn.metrics.pairwise import rbf_kernel
from sklearn.model_selection import train_test_split
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import FunctionTransformer, OneHotEncoder, StandardScaler

from common.errors import UserError
from common.files import verified_download
from common.safe_state import rebuild, to_plain

FILENAME = "housing.csv"
# The raw CSV of "Hands-On Machine Learning" (2nd ed.); the same bytes as the Kaggle copy.
DOWNLOAD_URL = "https://raw.githubusercontent.com/ageron/handson-ml2/master/datasets/housing/housing.csv"
SHA256 = "8a3727f4cf54ac1a327f69b1d5b4db54c5834ea81c6e4efc0d163300022a685e"

TARGET = "median_house_value"
CATEGORICAL = "ocean_proximity"
NUMERIC = [
    "longitude",
    "latitude",
    "housing_median_age",
    "total_rooms",
    "total_bedrooms",
    "population",
    "households",
    "median_income",
]
COLUMNS = NUMERIC + [TARGET, CATEGORICAL]
# Only this column is known to have gaps (207 rows); the imputer fills it from the training split.
MAY_BE_MISSING = {"total_bedrooms"}
# Columns the features take a log or a ratio of: each value must be above zero.
POSITIVE = ["housing_median_age", "total_rooms", "total_bedrooms", "population", "households", "median_income", TARGET]
PRICE_MIN, PRICE_CAP = 14_999.0, 500_001.0  # dollars; the file's floor and top-code

TEST_SIZE, TEST_SEED = 0.2, 42  # the standard split of this file
VAL_FRACTION = 0.1  # of the remaining 80%: 1,652 rows for early stopping and model choice

# (name, longitude, latitude) of the state's largest metropolitan centres.
CITIES = [
    ("san_francisco", -122.42, 37.77),
    ("los_angeles", -118.24, 34.05),
    ("san_diego", -117.16, 32.72),
    ("san_jose", -121.89, 37.34),
    ("sacramento", -121.49, 38.58),
    ("fresno", -119.79, 36.74),
]


# --------------------------------------------------------------------------- the file


def download(dest: Path, url: str = DOWNLOAD_URL, sha256: str = SHA256, timeout_s: float = 60) -> Path:
    """Fetch ``url`` to ``dest`` with its checksum verified (``common.files.verified_download``)."""
    hint = f"download {url} (SHA-256 {sha256}) into {Path(dest).parent} or pass --data-dir"
    return verified_download(url, dest, sha256, hint=hint, timeout_s=timeout_s)


def locate_csv(data_dir: Path, url: str = DOWNLOAD_URL) -> Path:
    """``data_dir/housing.csv``, downloaded (and verified) first when it is absent."""
    path = Path(data_dir) / FILENAME
    return path if path.exists() else download(path, url)


def read_housing(path: Path) -> pd.DataFrame:
    """Read and validate the CSV; every problem is one UserError naming file, column and row."""
    path = Path(path)
    try:
        frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    except pd.errors.EmptyDataError:
        raise UserError(f"{path}: file is empty; expected a header with columns {', '.join(COLUMNS)}") from None
    except (OSError, UnicodeDecodeError, pd.errors.ParserError) as err:
        first = str(err).strip().splitlines()[0]
        raise UserError(f"{path}: cannot be read as CSV ({first})") from None
    frame.columns = [c.strip() for c in frame.columns]
    missing = [c for c in COLUMNS if c not in frame.columns]
    if missing:
        raise UserError(
            f"{path}: missing column {', '.join(repr(c) for c in missing)}; expected columns {', '.join(COLUMNS)}"
        )
    if frame.empty:
        raise UserError(f"{path}: has a header but no data rows; expected the 20,640 housing rows")
    out = pd.DataFrame(index=frame.index)
    for column in NUMERIC + [TARGET]:
        text = frame[column].str.strip()
        values = pd.to_numeric(text.replace("", np.nan), errors="coerce")
        bad = values.isna() & (text != "")
        if bad.any():
            row = int(np.flatnonzero(bad.to_numpy())[0])
            raise UserError(
                f"{path}: column {column!r}, row {row + 2}: non-numeric value "
                f"{frame[column].iloc[row]!r}; expected a number"
            )
        blank = values.isna()
        if blank.any() and column not in MAY_BE_MISSING:
            row = int(np.flatnonzero(blank.to_numpy())[0])
            raise UserError(
                f"{path}: column {column!r}, row {row + 2}: empty value; "
                f"expected a number (only total_bedrooms may be empty)"
            )
        if np.isinf(values).any():
            row = int(np.flatnonzero(np.isinf(values).to_numpy())[0])
            raise UserError(
                f"{path}: column {column!r}, row {row + 2}: value {frame[column].iloc[row]!r} "
                "is not finite; expected a finite number"
            )
        if blank.all():
            raise UserError(f"{path}: column {column!r} is empty in every row; expected at least one value")
        out[column] = values.astype("float64")
    for column in POSITIVE:
        if (out[column] <= 0).any():
            row = int(np.flatnonzero((out[column] <= 0).to_numpy())[0])
            raise UserError(
                f"{path}: column {column!r}, row {row + 2}: value {out[column].iloc[row]:g}; "
                f"expected a number above 0 (the features take its log or divide by it)"
            )
    if out[TARGET].nunique() < 2:
        raise UserError(f"{path}: every row has the same {TARGET} ({out[TARGET].iloc[0]:g}); expected prices that vary")
    out[CATEGORICAL] = frame[CATEGORICAL].str.strip().replace("", np.nan)
    return out


# --------------------------------------------------------------------------- features


def _safe_ratio(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    return x[:, [0]] / np.maximum(x[:, [1]], 1.0)


def _ratio_names(_transformer, names: Sequence[str]) -> list[str]:
    return [f"{names[0]}_per_{names[1]}"]


def _ratio(log: bool = True) -> Pipeline:
    """``a / b`` of two count columns (imputed first), then log and standardise."""
    steps = [SimpleImputer(strategy="median"), FunctionTransformer(_safe_ratio, feature_names_out=_ratio_names)]
    if log:
        steps.append(FunctionTransformer(np.log, feature_names_out="one-to-one"))
    return make_pipeline(*steps, StandardScaler())


def _log_scaled() -> Pipeline:
    return make_pipeline(
        SimpleImputer(strategy="median"),
        FunctionTransformer(np.log1p, feature_names_out="one-to-one"),
        StandardScaler(),
    )


def _city_distances(x: np.ndarray) -> np.ndarray:
    """log(1 + km) from each (longitude, latitude) row to each city in CITIES (equirectangular)."""
    x = np.asarray(x, dtype=np.float64)
    lon, lat = x[:, [0]], x[:, [1]]
    city_lon = np.array([c[1] for c in CITIES])[None, :]
    city_lat = np.array([c[2] for c in CITIES])[None, :]
    dx = (lon - city_lon) * np.cos(np.radians(0.5 * (lat + city_lat))) * 111.2
    dy = (lat - city_lat) * 111.2
    return np.log1p(np.hypot(dx, dy))


def _city_names(_transformer, _names: Sequence[str]) -> list[str]:
    return [f"log_km_to_{name}" for name, _, _ in CITIES]


class ClusterSimilarity(BaseEstimator, TransformerMixin):
    """RBF similarity of each (longitude, latitude) to k-means centres fitted on training rows.

    Many narrow bumps give a smooth net what a tree gets from splitting latitude and longitude
    finely: a price level per neighbourhood. Weighted by price density would leak the target,
    so the centres follow where the rows are, nothing else.
    """

    def __init__(self, n_clusters: int = 48, gamma: float = 4.0, random_state: int = 0):
        self.n_clusters = n_clusters
        self.gamma = gamma  # 1/deg^2: a bump ~0.5 degree (~50 km) wide
        self.random_state = random_state

    def fit(self, x, y=None):
        self.kmeans_ = KMeans(self.n_clusters, n_init=4, random_state=self.random_state).fit(x)
        return self

    def transform(self, x):
        return rbf_kernel(np.asarray(x), self.kmeans_.cluster_centers_, gamma=self.gamma)

    def get_feature_names_out(self, names=None):
        return np.array([f"near_cluster_{i}" for i in range(self.n_clusters)], dtype=object)


class NeighbourPrices(BaseEstimator, TransformerMixin):
    """Mean log price of the k nearest *training* blocks, for each k in ``ks``, plus their distance.

    Like scikit-learn's ``TargetEncoder``, ``fit_transform`` on the training rows is cross-fitted:
    each training row's neighbours exclude the row itself (leave-one-out), so the feature never
    contains a row's own label; ``transform`` on new rows (validation, test) uses all training
    rows. Needs ``y`` (log price) at fit time.
    """

    def __init__(self, ks: tuple[int, ...] = (8, 32)):
        self.ks = ks

    @staticmethod
    def _km(x) -> np.ndarray:
        x = np.asarray(x, dtype=np.float64)
        return np.column_stack([x[:, 0] * 111.2 * np.cos(np.radians(36.0)), x[:, 1] * 111.2])

    def fit(self, x, y):
        from sklearn.neighbors import NearestNeighbors

        self.y_ = np.asarray(y, dtype=np.float64)
        self.train_km_ = self._km(x)
        self.nn_ = NearestNeighbors(n_neighbors=max(self.ks)).fit(self.train_km_)
        return self

    def __getstate__(self) -> dict:
        # The neighbour index is rebuilt from the training coordinates (deterministically, the
        # same tree) rather than stored: its internals are not plain data (common/safe_state.py).
        state = dict(super().__getstate__())  # a copy: object.__getstate__ returns __dict__ itself
        state.pop("nn_", None)
        return state

    def __setstate__(self, state: dict) -> None:
        from sklearn.neighbors import NearestNeighbors

        super().__setstate__(state)
        if hasattr(self, "train_km_"):
            self.nn_ = NearestNeighbors(n_neighbors=max(self.ks)).fit(self.train_km_)

    def _encode(self, dist: np.ndarray, idx: np.ndarray) -> np.ndarray:
        cols = []
        for k in self.ks:
            cols.append(self.y_[idx[:, :k]].mean(axis=1))
            cols.append(np.log1p(dist[:, k - 1]))
        return np.column_stack(cols)

    def fit_transform(self, x, y=None, **fit_params):
        if y is None:
            raise ValueError("NeighbourPrices needs y (log price) to fit")
        self.fit(x, y)
        return self._encode(*self.nn_.kneighbors())  # no query: each row's own entry excluded

    def transform(self, x):
        return self._encode(*self.nn_.kneighbors(self._km(x)))

    def get_feature_names_out(self, names=None):
        return np.array([n for k in self.ks for n in (f"mean_log_price_{k}nn", f"log_km_to_{k}th_nn")], dtype=object)


def make_preprocessor(n_clusters: int = 48, cluster_gamma: float = 4.0, seed: int = 0) -> ColumnTransformer:
    """The unfitted feature pipeline; each transformer is one named feature group."""
    lonlat = ["longitude", "latitude"]
    groups = [
        ("longitude", StandardScaler(), ["longitude"]),
        ("latitude", StandardScaler(), ["latitude"]),
        ("housing_median_age", StandardScaler(), ["housing_median_age"]),
        (
            "median_income",
            make_pipeline(FunctionTransformer(np.log, feature_names_out="one-to-one"), StandardScaler()),
            ["median_income"],
        ),
        ("total_rooms", _log_scaled(), ["total_rooms"]),
        ("total_bedrooms", _log_scaled(), ["total_bedrooms"]),
        ("population", _log_scaled(), ["population"]),
        ("households", _log_scaled(), ["households"]),
        ("rooms_per_household", _ratio(), ["total_rooms", "households"]),
        ("bedrooms_per_room", _ratio(), ["total_bedrooms", "total_rooms"]),
        ("population_per_household", _ratio(), ["population", "households"]),
        (
            "ocean_proximity",
            make_pipeline(
                SimpleImputer(strategy="most_frequent"), OneHotEncoder(handle_unknown="ignore", sparse_output=False)
            ),
            [CATEGORICAL],
        ),
        (
            "city_distances",
            make_pipeline(FunctionTransformer(_city_distances, feature_names_out=_city_names), StandardScaler()),
            lonlat,
        ),
        ("location_clusters", ClusterSimilarity(n_clusters, cluster_gamma, seed), lonlat),
        ("neighbour_prices", make_pipeline(NeighbourPrices(), StandardScaler()), lonlat),
    ]
    return ColumnTransformer(groups, remainder="drop", verbose_feature_names_out=True)


FEATURE_GROUPS = [name for name, _, _ in make_preprocessor().transformers]

# Everything a fitted preprocessor is built from: the only classes and functions that loading
# one from a checkpoint may call (common/safe_state.py).
TRUSTED = (
    ColumnTransformer,
    Pipeline,
    StandardScaler,
    SimpleImputer,
    FunctionTransformer,
    OneHotEncoder,
    KMeans,
    ClusterSimilarity,
    NeighbourPrices,
    np.log,
    np.log1p,
    _safe_ratio,
    _ratio_names,
    _city_distances,
    _city_names,
)


def preprocessor_to_plain(preprocessor: ColumnTransformer) -> dict:
    """The fitted preprocessor as tensors and plain values, for a checkpoint."""
    return to_plain(preprocessor, TRUSTED)


def preprocessor_from_plain(tree: dict, where: str) -> ColumnTransformer:
    """Inverse of ``preprocessor_to_plain``; UserError naming ``where`` if it is not one."""
    return rebuild(
        tree, TRUSTED, ColumnTransformer, where, "preprocessor", "re-run housing/train.py to write a new checkpoint"
    )


def group_columns(preprocessor: ColumnTransformer, groups: Sequence[str]) -> list[int]:
    """Output column indices of the named feature groups, in the preprocessor's order."""
    unknown = [g for g in groups if g not in preprocessor.output_indices_]
    if unknown:
        raise UserError(
            f"--features: unknown feature group {', '.join(unknown)}; choose from {', '.join(FEATURE_GROUPS)}"
        )
    cols: list[int] = []
    for name in FEATURE_GROUPS:
        if name in groups:
            s = preprocessor.output_indices_[name]
            cols.extend(range(s.start, s.stop))
    return cols


# --------------------------------------------------------------------------- target


def encode_target(price: np.ndarray, mean: float, std: float) -> np.ndarray:
    """Dollars -> standardised log price, what the net regresses."""
    return (np.log(price) - mean) / std


def decode_target(z: torch.Tensor, mean: float, std: float) -> torch.Tensor:
    """Net output -> whole dollars, clipped to [PRICE_MIN, PRICE_CAP] (see the module docstring).

    Rounding to the dollar (the labels are whole dollars) makes every error, squared error and
    their sums over a split exact integers in float64 (all below 2**53), so metrics summed in
    any order - on any number of ranks - come out bit-identical.
    """
    return torch.exp(z.double() * std + mean).clamp(PRICE_MIN, PRICE_CAP).round()


# --------------------------------------------------------------------------- splits


@dataclass
class Split:
    """One split as model-ready tensors plus what the plots need."""

    x: torch.Tensor  # float32 [n, n_features]
    y: torch.Tensor  # float32 [n], standardised log price
    price: torch.Tensor  # float64 [n], dollars as recorded (capped)
    lonlat: np.ndarray  # [n, 2], for the error map
    rows: np.ndarray  # row numbers in the CSV's data (0-based)


@dataclass
class HousingData:
    train: Split
    val: Split
    test: Split
    preprocessor: ColumnTransformer
    columns: list[int]  # the preprocessor's output columns fed to the net
    target_mean: float  # of log(price) over training rows
    target_std: float
    feature_names: list[str]
    csv_path: Path
    raw: pd.DataFrame  # the validated CSV, for baselines that take the original columns


def split_rows(n_rows: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(train, val, test) row indices; test is the standard 20% split, fixed whatever the seed."""
    rest, test = train_test_split(np.arange(n_rows), test_size=TEST_SIZE, random_state=TEST_SEED)
    train, val = train_test_split(rest, test_size=VAL_FRACTION, random_state=seed)
    return train, val, test


def load_housing(
    data_dir: Path,
    seed: int,
    groups: Sequence[str] = tuple(FEATURE_GROUPS),
    n_clusters: int = 48,
    cluster_gamma: float = 4.0,
    url: str = DOWNLOAD_URL,
    preprocessor: ColumnTransformer | None = None,
    target_stats: tuple[float, float] | None = None,
) -> HousingData:
    """Everything the programs need from the CSV. Pass ``preprocessor`` and ``target_stats``
    (from a checkpoint) to reuse a fitted pipeline instead of fitting a new one."""
    path = locate_csv(data_dir, url)
    frame = read_housing(path)
    if len(frame) < 50:
        raise UserError(f"{path}: only {len(frame)} data rows; expected the 20,640 housing rows")
    train_rows, val_rows, test_rows = split_rows(len(frame), seed)
    if preprocessor is None and len(train_rows) < n_clusters:
        raise UserError(
            f"--n-clusters {n_clusters} needs at least {n_clusters} training rows (one per "
            f"location cluster); {path} gives {len(train_rows)}: lower --n-clusters or use more rows"
        )
    train_frame = frame.iloc[train_rows]
    log_price = np.log(train_frame[TARGET].to_numpy())
    if preprocessor is None:
        preprocessor = make_preprocessor(n_clusters, cluster_gamma, seed)
        # fit_transform, not fit().transform(): neighbour prices of training rows are cross-fitted.
        train_x = preprocessor.fit_transform(train_frame, log_price)
    else:
        train_x = preprocessor.transform(train_frame)
    if target_stats is None:
        target_stats = (float(log_price.mean()), float(log_price.std()))
    mean, std = target_stats
    columns = group_columns(preprocessor, groups)
    names = list(preprocessor.get_feature_names_out())

    def make(rows: np.ndarray, x: np.ndarray | None = None) -> Split:
        part = frame.iloc[rows]
        x = (preprocessor.transform(part) if x is None else x)[:, columns]
        price = part[TARGET].to_numpy()
        return Split(
            x=torch.tensor(x, dtype=torch.float32),
            y=torch.tensor(encode_target(price, mean, std), dtype=torch.float32),
            price=torch.tensor(price, dtype=torch.float64),
            lonlat=part[["longitude", "latitude"]].to_numpy(),
            rows=rows,
        )

    return HousingData(
        make(train_rows, train_x),
        make(val_rows),
        make(test_rows),
        preprocessor,
        columns,
        mean,
        std,
        [names[c] for c in columns],
        path,
        frame,
    )
