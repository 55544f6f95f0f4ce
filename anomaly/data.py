"""UNSW-NB15 files -> validated DataFrames -> train / validation / test splits.

Two layouts of the dataset are understood, looked for in ``--data-dir`` in this order:

1. the partition CSVs ``UNSW_NB15_training-set.csv`` / ``UNSW_NB15_testing-set.csv``
   (45 columns with a header whose first name, ``id``, may carry a UTF-8 BOM), as plain files or
   inside any ``*.zip`` in the folder (Kaggle's ``UNSW_NB15_82332.csv.zip`` holds one of them);
2. the four raw CSVs ``UNSW-NB15_1.csv`` .. ``UNSW-NB15_4.csv`` (49 columns, no header; the
   names come from ``NUSW-NB15_features.csv``), which add the timestamps ``stime``/``ltime``.

Every file is validated before anything is written: a missing column, a value that is not a
number in a numeric column, or an empty file raises a one-line ``UserError`` naming the file, the
column and the row (1-based data row; the header is line 1 of a partition file).

Splits (all seeded, stratified on ``attack_cat`` so rare attacks land in every split):
- one partition present: train / validation / test = 1 - val - test, val, test of its rows;
- both present: the official training set (split into train and validation) and testing set.

Duplicates: the 82,332-row partition has many rows whose features equal another row's, so a
random split puts copies of test rows into train. ``split_data`` marks every test row that has an
identical feature row in train (``test_seen_in_train``) so metrics can be reported on the whole
test split and on the unseen part only.
"""

from __future__ import annotations

import io
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.model_selection import train_test_split

from common.errors import UserError

TRAIN_FILE = "UNSW_NB15_training-set.csv"
TEST_FILE = "UNSW_NB15_testing-set.csv"
RAW_FILES = tuple(f"UNSW-NB15_{i}.csv" for i in range(1, 5))
WHERE_TO_GET = (
    "UNSW-NB15 has no unauthenticated download link: get it from the UNSW Canberra dataset page "
    "(https://research.unsw.edu.au/projects/unsw-nb15-dataset) or Kaggle "
    "(https://www.kaggle.com/datasets/mrwellsdavid/unsw-nb15) and put in --data-dir either "
    f"{TRAIN_FILE} and/or {TEST_FILE} (plain or inside a .zip) or the raw "
    f"{', '.join(RAW_FILES)}"
)

CATEGORICAL = ("proto", "service", "state")
# The numeric features both layouts share (partition names; raw names are mapped onto these).
NUMERIC = (
    "dur",
    "spkts",
    "dpkts",
    "sbytes",
    "dbytes",
    "sttl",
    "dttl",
    "sload",
    "dload",
    "sloss",
    "dloss",
    "sinpkt",
    "dinpkt",
    "sjit",
    "djit",
    "swin",
    "stcpb",
    "dtcpb",
    "dwin",
    "tcprtt",
    "synack",
    "ackdat",
    "smean",
    "dmean",
    "trans_depth",
    "response_body_len",
    "ct_srv_src",
    "ct_state_ttl",
    "ct_dst_ltm",
    "ct_src_dport_ltm",
    "ct_dst_sport_ltm",
    "ct_dst_src_ltm",
    "is_ftp_login",
    "ct_ftp_cmd",
    "ct_flw_http_mthd",
    "ct_src_ltm",
    "ct_srv_dst",
    "is_sm_ips_ports",
)
PARTITION_ONLY = ("rate",)  # in the partition files, not in the raw ones
PARTITION_COLUMNS = ("id", *NUMERIC[:5], "rate", *NUMERIC[5:], *CATEGORICAL, "attack_cat", "label")
# Names from NUSW-NB15_features.csv, in file order, lower-cased and mapped to partition names.
RAW_COLUMNS = (
    "srcip",
    "sport",
    "dstip",
    "dsport",
    "proto",
    "state",
    "dur",
    "sbytes",
    "dbytes",
    "sttl",
    "dttl",
    "sloss",
    "dloss",
    "service",
    "sload",
    "dload",
    "spkts",
    "dpkts",
    "swin",
    "dwin",
    "stcpb",
    "dtcpb",
    "smean",
    "dmean",
    "trans_depth",
    "response_body_len",
    "sjit",
    "djit",
    "stime",
    "ltime",
    "sinpkt",
    "dinpkt",
    "tcprtt",
    "synack",
    "ackdat",
    "is_sm_ips_ports",
    "ct_state_ttl",
    "ct_flw_http_mthd",
    "is_ftp_login",
    "ct_ftp_cmd",
    "ct_srv_src",
    "ct_srv_dst",
    "ct_dst_ltm",
    "ct_src_ltm",
    "ct_src_dport_ltm",
    "ct_dst_sport_ltm",
    "ct_dst_src_ltm",
    "attack_cat",
    "label",
)
# Raw-file columns that are blank when zero (documented quirk of the raw CSVs).
RAW_BLANK_IS_ZERO = ("ct_flw_http_mthd", "is_ftp_login")
# The raw files spell a few attack categories differently from the partitions.
ATTACK_CAT_FIXES = {"Backdoors": "Backdoor", "": "Normal"}
NORMAL = "Normal"
SPLITS = ("grouped", "random")


@dataclass
class Splits:
    """The three splits as DataFrames (original columns) plus where they came from."""

    train: pd.DataFrame
    val: pd.DataFrame
    test: pd.DataFrame
    test_seen_in_train: np.ndarray  # bool per test row: identical feature row exists in train
    source: str  # human-readable description of files and split rule
    time_column: str | None  # "stime" for the raw files, None for the partitions


# ---------------------------------------------------------------------------------------------
# Finding and reading files


def _find_in_dir(data_dir: Path, name: str) -> tuple[str, bytes] | None:
    """``(display_name, bytes)`` of ``name`` as a plain file or inside a zip in ``data_dir``."""
    plain = data_dir / name
    if plain.is_file():
        return str(plain), plain.read_bytes()
    for archive in sorted(p for p in data_dir.glob("*.zip") if p.is_file()):  # a folder named x.zip is not one
        try:
            with zipfile.ZipFile(archive) as zf:
                for member in zf.namelist():
                    if Path(member).name == name:
                        return f"{archive}:{member}", zf.read(member)
        except zipfile.BadZipFile:
            raise UserError(f"{archive}: not a readable zip file; expected a zip holding {name}") from None
        except (zlib.error, EOFError, OSError) as err:  # the index reads, the compressed data is damaged
            detail = str(err).splitlines()[0] if str(err) else "it ends too soon"
            raise UserError(
                f"{archive}: damaged, {name} cannot be read from it ({detail}); download it again"
            ) from None
    return None


def _read_csv_text(display: str, raw: bytes, header: bool, names: tuple[str, ...] | None) -> pd.DataFrame:
    """Parse CSV bytes as strings (validated and converted afterwards, with row numbers)."""
    if not raw.strip():
        raise UserError(
            f"{display}: file is empty; expected a UNSW-NB15 CSV "
            f"({'a header line and rows' if header else 'rows of 49 values'})"
        )
    try:
        frame = pd.read_csv(
            io.BytesIO(raw),
            dtype=str,
            keep_default_na=False,
            encoding="utf-8-sig",
            header=0 if header else None,
            names=None if header else list(names),
            skipinitialspace=True,
            low_memory=False,
        )
    except (pd.errors.ParserError, UnicodeDecodeError) as err:
        first = str(err).strip().splitlines()[0]
        raise UserError(f"{display}: not a readable CSV ({first})") from None
    if header:
        frame.columns = [str(c).strip().lstrip("\ufeff").lower() for c in frame.columns]
    return frame


def _to_number(frame: pd.DataFrame, column: str, display: str, first_line: int) -> pd.Series:
    """Convert one column to float64, naming the first offending row if any value is not numeric."""
    values = frame[column].str.strip()
    numbers = pd.to_numeric(values, errors="coerce")
    bad = numbers.isna().to_numpy() | ~np.isfinite(numbers.to_numpy(dtype=float, na_value=np.nan))
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise UserError(
            f"{display}: column '{column}' row {i + 1} (line {i + first_line}): "
            f"value {frame[column].iloc[i]!r} is not a finite number; expected a number in every row"
        )
    return numbers.astype(np.float64)


def validate_partition(
    frame: pd.DataFrame, display: str, required: tuple[str, ...] = PARTITION_COLUMNS, need_labels: bool = True
) -> pd.DataFrame:
    """Check the columns and types of a partition-layout frame; return it with numbers converted."""
    if len(frame) == 0:
        raise UserError(f"{display}: has a header but no rows; expected UNSW-NB15 records")
    wanted = [c for c in required if need_labels or c not in ("id", "attack_cat", "label")]
    missing = [c for c in wanted if c not in frame.columns]
    if missing:
        raise UserError(
            f"{display}: header (line 1) is missing column(s) {', '.join(repr(c) for c in missing)}; "
            f"expected the UNSW-NB15 partition columns {', '.join(required)}"
        )
    return _convert(frame, display, first_line=2, need_labels=need_labels)


# Byte, packet and load columns: counts and rates, whose log1p the features take
# (anomaly/features.py), so a negative value would become NaN inside the network.
NON_NEGATIVE = ("sbytes", "dbytes", "spkts", "dpkts", "sload", "dload")


def _convert(frame: pd.DataFrame, display: str, first_line: int, need_labels: bool) -> pd.DataFrame:
    """Numbers to float64, categories stripped and lower-cased, labels checked."""
    out = frame.copy()
    numeric = [c for c in (*NUMERIC, *PARTITION_ONLY, "stime", "ltime", "id") if c in out.columns]
    for column in numeric:
        out[column] = _to_number(out, column, display, first_line)
    for column in (c for c in NON_NEGATIVE if c in out.columns):
        negative = (out[column] < 0).to_numpy()
        if negative.any():
            i = int(np.flatnonzero(negative)[0])
            raise UserError(
                f"{display}: column '{column}' row {i + 1} (line {i + first_line}): value "
                f"{frame[column].iloc[i]!r}; expected a count or rate, 0 or more "
                "(the features take its log1p)"
            )
    for column in CATEGORICAL:
        out[column] = out[column].str.strip().str.lower()
    if need_labels or "label" in out.columns:
        label = _to_number(out, "label", display, first_line)
        bad = ~label.isin([0.0, 1.0]).to_numpy()
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise UserError(
                f"{display}: column 'label' row {i + 1} (line {i + first_line}): "
                f"value {frame['label'].iloc[i]!r}; expected 0 (normal) or 1 (attack)"
            )
        out["label"] = label.astype(np.int64)
        cat = out.get("attack_cat", pd.Series("", index=out.index)).str.strip().replace(ATTACK_CAT_FIXES)
        # Normal rows' category is implied by the label when a file leaves it blank.
        out["attack_cat"] = np.where(out["label"] == 0, NORMAL, cat)
    return out


def read_partition(display: str, raw: bytes, need_labels: bool = True) -> pd.DataFrame:
    """Read and validate one partition CSV given as bytes."""
    return validate_partition(_read_csv_text(display, raw, True, None), display, need_labels=need_labels)


def read_raw(display: str, raw: bytes) -> pd.DataFrame:
    """Read and validate one headerless raw CSV (49 columns)."""
    frame = _read_csv_text(display, raw, False, RAW_COLUMNS)
    # A row with fewer fields leaves NaN in the last columns; pandas rejects rows with more.
    short = frame[list(RAW_COLUMNS)].isna().any(axis=1).to_numpy()
    if short.any():
        i = int(np.flatnonzero(short)[0])
        column = RAW_COLUMNS[int(np.flatnonzero(frame.iloc[i].isna().to_numpy())[0])]
        raise UserError(
            f"{display}: row {i + 1} (line {i + 1}) has no value for column '{column}'; "
            f"expected {len(RAW_COLUMNS)} comma-separated values per row"
        )
    for column in RAW_BLANK_IS_ZERO:
        frame[column] = frame[column].str.strip().replace("", "0")
    return _convert(frame, display, first_line=1, need_labels=True)


def read_csv_file(path: Path, need_labels: bool = True) -> pd.DataFrame:
    """Read one CSV of either layout from disk (used by ``predict`` on new files)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such file; expected a UNSW-NB15 CSV")
    raw = path.read_bytes()
    first_line = raw.lstrip(b"\xef\xbb\xbf").split(b"\n", 1)[0].decode("utf-8", "replace")
    # A raw file's first field is an IP address; a partition's first line is its header.
    if first_line[:1].isdigit() and first_line.count(",") == len(RAW_COLUMNS) - 1:
        return read_raw(str(path), raw)
    return read_partition(str(path), raw, need_labels=need_labels)


def load_frames(data_dir: Path) -> tuple[dict[str, pd.DataFrame], str | None]:
    """Find and read whatever layout ``data_dir`` holds.

    Returns ``({"train": df} or {"train": df, "test": df} or {"all": df}, time_column)``.
    """
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise UserError(f"--data-dir {data_dir}: no such folder. {WHERE_TO_GET}")
    found = {key: _find_in_dir(data_dir, name) for key, name in (("train", TRAIN_FILE), ("test", TEST_FILE))}
    parts = {key: read_partition(*hit) for key, hit in found.items() if hit is not None}
    if len(parts) == 2:
        return parts, None
    if len(parts) == 1:
        return {"all": next(iter(parts.values()))}, None
    raws = [_find_in_dir(data_dir, name) for name in RAW_FILES]
    raws = [hit for hit in raws if hit is not None]
    if raws:
        frame = pd.concat([read_raw(*hit) for hit in raws], ignore_index=True)
        frame = frame.sort_values("stime", kind="stable").reset_index(drop=True)
        return {"all": frame}, "stime"
    raise UserError(f"--data-dir {data_dir}: no UNSW-NB15 files found. {WHERE_TO_GET}")


# ---------------------------------------------------------------------------------------------
# Splitting


def feature_columns(frame: pd.DataFrame) -> list[str]:
    """The columns that describe a flow (what a detector may look at)."""
    return [c for c in (*NUMERIC, *PARTITION_ONLY, *CATEGORICAL) if c in frame.columns]


def _stratify_key(frame: pd.DataFrame) -> pd.Series:
    # attack_cat with very rare categories merged, so every stratum has a few rows in each split.
    counts = frame["attack_cat"].value_counts()
    common = frame["attack_cat"].map(counts) >= 10
    # A "rare" stratum needs two rows to be split; a lone rare row joins the largest stratum.
    merged = "rare" if (~common).sum() >= 2 else counts.index[0]
    return frame["attack_cat"].where(common, merged)


def _split(frame: pd.DataFrame, fraction: float, seed: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    kept, taken = train_test_split(frame, test_size=fraction, random_state=seed, stratify=_stratify_key(frame))
    # Keep record order inside each split (the time-series picture depends on it).
    return kept.sort_index(), taken.sort_index()


def _split_groups(frame: pd.DataFrame, fraction: float, seed: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Like ``_split``, but every group of identical feature rows lands on one side.

    The distinct feature rows are split (stratified on each group's most common ``attack_cat``),
    then every row follows its group, so no row on one side has a copy on the other. The row
    shares only approximate ``fraction``: a group of 1,000 identical attacks moves as one.
    """
    groups = pd.util.hash_pandas_object(frame[feature_columns(frame)], index=False).to_numpy()
    per_group = pd.DataFrame({"group": groups, "attack_cat": frame["attack_cat"].to_numpy()})
    sizes = per_group.value_counts().reset_index(name="rows")  # largest first
    distinct = sizes.drop_duplicates("group").set_index("group")[["attack_cat"]]
    kept, taken = train_test_split(distinct, test_size=fraction, random_state=seed, stratify=_stratify_key(distinct))
    in_taken = np.isin(groups, taken.index.to_numpy())
    return frame[~in_taken], frame[in_taken]  # record order is kept


def seen_in(reference: pd.DataFrame, query: pd.DataFrame) -> np.ndarray:
    """Per row of ``query``: does ``reference`` hold a row with identical features?"""
    cols = feature_columns(query)
    ref = pd.util.hash_pandas_object(reference[cols], index=False)
    qry = pd.util.hash_pandas_object(query[cols], index=False)
    return qry.isin(set(ref.to_numpy())).to_numpy()


def split_data(
    data_dir: Path,
    val_fraction: float,
    test_fraction: float,
    seed: int,
    max_rows: int | None = None,
    split: str = "grouped",
) -> Splits:
    """Load ``data_dir`` and cut it into train / validation / test (see the module docstring).

    ``val_fraction`` and ``test_fraction`` are fractions of all rows when one file is split; with
    the official partitions, validation is ``val_fraction`` of the training file and the test
    fraction is unused. ``max_rows`` takes a stratified subset first (for quick runs and tests).
    ``split`` is "grouped" (identical feature rows stay on one side, so no test row has a copy in
    train) or "random" (rows split independently, as most published UNSW-NB15 figures are).
    """
    if split not in SPLITS:
        raise UserError(f"--split {split!r}: expected one of {', '.join(SPLITS)}")
    cut = _split_groups if split == "grouped" else _split
    frames, time_column = load_frames(data_dir)
    if max_rows is not None:
        frames = {k: (_split(f, max_rows / len(f), seed)[1] if len(f) > max_rows else f) for k, f in frames.items()}
    if "all" in frames:
        frame = frames["all"]
        rest, test = cut(frame, test_fraction, seed)
        train, val = cut(rest, val_fraction / (1 - test_fraction), seed + 1)
        source = (
            f"one file, {len(frame)} rows, {split} stratified seeded split "
            f"{1 - val_fraction - test_fraction:.2f}/{val_fraction:.2f}/{test_fraction:.2f}"
        )
    else:
        train, val = cut(frames["train"], val_fraction, seed)
        test = frames["test"]  # the official test file: copies of training rows may remain
        source = (
            f"official partitions: train {len(frames['train'])} rows "
            f"({val_fraction:.2f} carved out for validation), test {len(test)} rows"
        )
    for name, part in (("training", train), ("validation", val), ("test", test)):
        if (part["label"] == 0).sum() == 0 or (part["label"] == 1).sum() == 0:
            raise UserError(
                f"--data-dir {data_dir}: the {name} split has no "
                f"{'normal' if (part['label'] == 0).sum() == 0 else 'attack'} rows; "
                "expected both classes (use more data or other split fractions)"
            )
    return Splits(train, val, test, seen_in(train, test), source, time_column)


def attack_categories(frame: pd.DataFrame) -> list[str]:
    """The attack categories present in ``frame`` (a split), sorted; "Normal" is not one."""
    return sorted(set(frame["attack_cat"]) - {"Normal"})


def hold_out(splits: Splits, category: str) -> Splits:
    """``splits`` without ``category`` in train and validation; test keeps every row."""
    known = attack_categories(splits.test)
    if category not in known:
        raise UserError(
            f"--holdout {category!r}: not an attack category of this data; expected one of {', '.join(known)}"
        )
    keep = {name: getattr(splits, name)[getattr(splits, name)["attack_cat"] != category] for name in ("train", "val")}
    return Splits(
        keep["train"],
        keep["val"],
        splits.test,
        splits.test_seen_in_train,
        f"{splits.source}; {category} removed from train and validation",
        splits.time_column,
    )
