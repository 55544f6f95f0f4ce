"""An exploration report of UNSW-NB15 for a person to read: Markdown plus pictures.

Sections: class balance per ``attack_cat``; duplicated feature rows; missing and constant
columns; per-feature summaries; the most skewed features (why ``features.py`` takes ``log1p``);
correlations (the most correlated pairs and a heatmap); the categorical levels.
Example: ``python anomaly/explore.py --data-dir ../shared/data --out-dir runs/anomaly-explore``
(writes ``report.md`` and ``plots/*.png`` there).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pandas as pd

from anomaly.data import CATEGORICAL, NUMERIC, PARTITION_ONLY, feature_columns, load_frames
from common.errors import run_main
from common.figures import pyplot, save_figure
from common.files import write_text_atomic

plt = pyplot()  # this module only draws: Agg backend, loaded when it is imported


def _table(frame: pd.DataFrame, floatfmt: str = "{:.4g}") -> str:
    """A DataFrame as a Markdown table (no extra dependency)."""
    cols = [frame.index.name or ""] + [str(c) for c in frame.columns]
    lines = ["| " + " | ".join(cols) + " |", "|" + " --- |" * len(cols)]
    for idx, row in frame.iterrows():
        cells = [
            f"{int(v):,}"
            if isinstance(v, (float, np.floating, int, np.integer)) and float(v).is_integer() and abs(v) < 1e15
            else floatfmt.format(v)
            if isinstance(v, (float, np.floating))
            else f"{v}"
            for v in row
        ]
        lines.append("| " + " | ".join([str(idx), *cells]) + " |")
    return "\n".join(lines)


def explore(frame: pd.DataFrame, source: str, out_dir: Path) -> str:
    """Write the pictures into ``out_dir/plots`` and return the Markdown report."""
    plots = out_dir / "plots"
    plots.mkdir(parents=True, exist_ok=True)
    numeric = [c for c in (*NUMERIC, *PARTITION_ONLY) if c in frame.columns]
    md = [
        f"# UNSW-NB15 exploration\n\nSource: {source}; {len(frame):,} rows, "
        f"{len(feature_columns(frame))} feature columns ({len(numeric)} numeric, "
        f"{len(CATEGORICAL)} categorical).\n"
    ]

    # Class balance.
    balance = frame["attack_cat"].value_counts().to_frame("rows")
    balance["share"] = balance["rows"] / len(frame)
    balance.index.name = "attack_cat"
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.barh(
        balance.index[::-1],
        balance["rows"][::-1],
        color=["tab:blue" if n == "Normal" else "tab:red" for n in balance.index[::-1]],
    )
    ax.set_xscale("log")
    ax.set_xlabel("rows (log scale)")
    ax.set_title("class balance per attack_cat")
    save_figure(fig, plots / "class_balance.png")
    attack_share = float((frame["label"] == 1).mean())
    md += [
        "## Class balance\n",
        f"Attacks are {attack_share:.1%} of the rows, so flagging everything "
        f"already scores F1 = {2 * attack_share / (1 + attack_share):.3f}: any detector must beat that.\n",
        _table(balance),
        "\n![class balance](plots/class_balance.png)\n",
    ]

    # Duplicates.
    cols = feature_columns(frame)
    dup_any = frame.duplicated(subset=cols, keep=False)
    dup_extra = frame.duplicated(subset=cols, keep="first")
    conflicting = frame[dup_any].groupby(cols, dropna=False)["label"].nunique().gt(1).sum()
    by_cat = dup_extra.groupby(frame["attack_cat"]).mean().sort_values(ascending=False).to_frame("duplicate share")
    by_cat.index.name = "attack_cat"
    md += [
        "## Duplicated feature rows\n",
        f"{int(dup_extra.sum()):,} rows repeat the features of an earlier row ({int(dup_any.sum()):,} rows "
        f"take part in a duplicate group); {int(conflicting)} groups carry both labels. A random split "
        "therefore puts copies of test rows into train: `train.py` and `compare.py` also report F1 on "
        "the test rows with no identical row in train.\n",
        _table(by_cat),
        "",
    ]

    # Missing and constant columns.
    missing = frame[cols].isna().sum()
    blank = frame[list(CATEGORICAL)].apply(lambda s: s.isin(["", "-"]).sum())
    constant = [c for c in cols if frame[c].nunique(dropna=False) <= 1]
    md += [
        "## Missing and constant columns\n",
        f"- missing values: {', '.join(f'{c} ({n})' for c, n in missing.items() if n) or 'none'}",
        "- categorical levels '-' (no value): " + ", ".join(f"{c} {n:,} rows" for c, n in blank.items()),
        f"- constant columns: {', '.join(constant) or 'none'}",
        "",
    ]

    # Per-feature summaries.
    data = frame[numeric]
    summary = pd.DataFrame(
        {
            "mean": data.mean(),
            "std": data.std(),
            "min": data.min(),
            "median": data.median(),
            "max": data.max(),
            "zeros": (data == 0).mean(),
            "distinct": data.nunique(),
            "skew": data.skew(),
            "normal median": data[frame["label"] == 0].median(),
            "attack median": data[frame["label"] == 1].median(),
        }
    )
    summary.index.name = "feature"
    md += ["## Numeric features\n", "`zeros` is the share of rows equal to 0.\n", _table(summary), ""]

    # Skew.
    skewed = summary["skew"].abs().sort_values(ascending=False)
    top = list(skewed.index[:8])
    fig, axes = plt.subplots(2, 4, figsize=(14, 6))
    for ax, col in zip(axes.flat, top):
        for label, color, name in ((0, "tab:blue", "normal"), (1, "tab:red", "attack")):
            values = np.log1p(data.loc[frame["label"] == label, col].clip(lower=0))
            ax.hist(values, bins=50, alpha=0.55, color=color, label=name)
        ax.set_title(f"log1p({col}), skew {summary.loc[col, 'skew']:.0f}", fontsize=9)
        ax.set_yscale("log")
    axes.flat[0].legend()
    save_figure(fig, plots / "skewed_features.png")
    heavy = int((summary["skew"] > 2).sum())
    md += [
        "## Most skewed features\n",
        f"{heavy} of {len(numeric)} numeric features have skew above 2 (a few huge flows dominate "
        "their scale), hence `log1p` before scaling in `features.py`. The eight most skewed, "
        "after `log1p`, normal vs attack:\n",
        _table(skewed.head(12).to_frame("|skew|")),
        "\n![skewed features](plots/skewed_features.png)\n",
    ]

    # Correlations.
    corr = np.log1p(data.clip(lower=0)).corr()
    pairs = corr.where(np.triu(np.ones(corr.shape, dtype=bool), k=1)).stack().rename("correlation").to_frame()
    pairs["abs"] = pairs["correlation"].abs()
    pairs = pairs.sort_values("abs", ascending=False).drop(columns="abs").head(15)
    pairs.index = [f"{a} ~ {b}" for a, b in pairs.index]
    pairs.index.name = "pair"
    fig, ax = plt.subplots(figsize=(11, 9))
    im = ax.imshow(corr.fillna(0), cmap="RdBu_r", vmin=-1, vmax=1)
    ax.set_xticks(range(len(corr)), corr.columns, rotation=90, fontsize=7)
    ax.set_yticks(range(len(corr)), corr.columns, fontsize=7)
    fig.colorbar(im, ax=ax, shrink=0.8)
    ax.set_title("correlation of log1p(numeric features)")
    save_figure(fig, plots / "correlations.png")
    label_corr = np.log1p(data.clip(lower=0)).corrwith(frame["label"]).abs().sort_values(ascending=False)
    md += [
        "## Correlations\n",
        "Pearson correlation of `log1p` values. Strongly correlated pairs carry "
        "the same information twice (bytes vs packets vs load), which the autoencoder's bottleneck "
        "and PCA exploit. Most correlated pairs:\n",
        _table(pairs),
        "\nFeatures most correlated with the label (absolute): "
        + ", ".join(f"{c} {v:.2f}" for c, v in label_corr.head(8).items())
        + "\n",
        "![correlations](plots/correlations.png)\n",
    ]

    # Categorical levels and the low-cardinality numeric codes.
    md.append("## Categorical levels\n")
    for col in (*CATEGORICAL, "sttl", "dttl"):
        shares = pd.crosstab(frame[col], frame["label"], normalize="columns")
        counts = frame[col].value_counts()
        shares = shares.loc[counts.index[:8]].rename(columns={0: "share of normal", 1: "share of attack"})
        shares.index.name = col
        md += [
            f"`{col}`: {frame[col].nunique()} levels, {int((counts < 20).sum())} seen fewer than 20 "
            "times (folded into one level by `features.py`). Most frequent:\n",
            _table(shares),
            "",
        ]
    md.append(
        "`sttl`/`dttl` take a handful of values (initial TTL of the sending stack), so "
        "`features.py` one-hot encodes them like `proto`, `service` and `state`.\n"
    )
    return "\n".join(md)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", type=Path, default=Path("data"), help="UNSW-NB15 folder")
    parser.add_argument("--out-dir", type=Path, default=Path("runs/anomaly-explore"))
    return parser.parse_args(argv)


def main() -> None:
    args = parse_args()
    frames, _ = load_frames(args.data_dir)  # validates before anything is written
    frame = pd.concat(list(frames.values()), ignore_index=True)
    source = f"{args.data_dir} ({', '.join(frames)})"
    report = explore(frame, source, args.out_dir)
    write_text_atomic(args.out_dir / "report.md", report)
    print(f"wrote {args.out_dir / 'report.md'} and {len(list((args.out_dir / 'plots').glob('*.png')))} pictures")


if __name__ == "__main__":
    run_main(main)
