"""What a housing run shows a person: baselines on the same split, a results table, four plots."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from common.report import plot_curves
from housing import data as hdata


def _rmse_mae_r2(pred: np.ndarray, price: np.ndarray) -> dict[str, float]:
    err = pred - price
    return {"rmse": float(np.sqrt(np.mean(err ** 2))), "mae": float(np.mean(np.abs(err))),
            "r2": float(1 - np.sum(err ** 2) / np.sum((price - price.mean()) ** 2))}


def run_baselines(data: hdata.HousingData, seed: int) -> dict[str, dict[str, float]]:
    """Two scikit-learn models fitted on the net's training rows, scored on the same test rows.

    - LinearRegression on the net's own features and log target: what the features alone buy.
    - HistGradientBoostingRegressor on the nine original columns (``ocean_proximity`` as a
      native categorical, dollars as target): the usual strong baseline for this file.
    """
    from sklearn.ensemble import HistGradientBoostingRegressor
    from sklearn.linear_model import LinearRegression

    price = data.test.price.numpy()
    linear = LinearRegression().fit(data.train.x.numpy(), data.train.y.numpy())
    linear_pred = hdata.decode_target(torch.from_numpy(linear.predict(data.test.x.numpy())),
                                      data.target_mean, data.target_std).numpy()
    raw = data.raw[hdata.NUMERIC + [hdata.CATEGORICAL]].copy()
    raw[hdata.CATEGORICAL] = raw[hdata.CATEGORICAL].astype("category")
    boost = HistGradientBoostingRegressor(max_iter=500, learning_rate=0.1, max_leaf_nodes=63,
                                          categorical_features="from_dtype", early_stopping=False,
                                          random_state=seed)
    boost.fit(raw.iloc[data.train.rows], data.raw[hdata.TARGET].iloc[data.train.rows])
    boost_pred = np.clip(boost.predict(raw.iloc[data.test.rows]), hdata.PRICE_MIN, hdata.PRICE_CAP).round()
    return {"LinearRegression (net's features, log target)": _rmse_mae_r2(linear_pred, price),
            "HistGradientBoosting (9 original columns)": _rmse_mae_r2(boost_pred, price)}


def results_table(test: dict[str, Any], baselines: dict[str, dict[str, float]] | None,
                  arch: str) -> str:
    """Markdown: the net against the baselines on the same test rows."""
    rows = [(f"MLP {arch} (this run)", test)] + list((baselines or {}).items())
    lines = ["# Test results (standard 20% split, random_state=42)", "",
             "| model | RMSE ($) | MAE ($) | R² |", "| --- | ---: | ---: | ---: |"]
    lines += [f"| {name} | {m['rmse']:,.0f} | {m['mae']:,.0f} | {m['r2']:.4f} |" for name, m in rows]
    return "\n".join(lines) + "\n"


def plot_all(rows: list[dict[str, Any]], split: hdata.Split, predictions: torch.Tensor,
             plots_dir: Path) -> None:
    """loss_curves.png, predicted_vs_actual.png, residuals.png, error_map.png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plots_dir = Path(plots_dir)
    plot_curves(rows, {"MSE on standardised log price": ["train_loss", "val_loss"],
                       "validation RMSE ($)": ["val_rmse"]},
                plots_dir / "loss_curves.png", "housing MLP")
    pred = predictions.numpy() / 1000
    actual = split.price.numpy() / 1000
    resid = pred - actual

    fig, ax = plt.subplots(figsize=(5.5, 5))
    ax.scatter(actual, pred, s=3, alpha=0.3)
    ax.plot([0, 520], [0, 520], color="k", lw=1, label="perfect")
    ax.axvline(hdata.PRICE_CAP / 1000, color="r", ls="--", lw=1, label="$500,001 cap")
    ax.set(xlabel="actual price ($k)", ylabel="predicted price ($k)", title="test: predicted vs actual")
    ax.legend(loc="upper left")
    fig.tight_layout()
    fig.savefig(plots_dir / "predicted_vs_actual.png", dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4.5))
    ax.scatter(pred, resid, s=3, alpha=0.3)
    ax.axhline(0, color="k", lw=1)
    ax.set(xlabel="predicted price ($k)", ylabel="predicted - actual ($k)",
           title="test: residuals vs predicted")
    fig.tight_layout()
    fig.savefig(plots_dir / "residuals.png", dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6.5, 6))
    limit = np.percentile(np.abs(resid), 98)
    order = np.argsort(np.abs(resid))  # largest errors drawn last, on top
    points = ax.scatter(split.lonlat[order, 0], split.lonlat[order, 1], c=resid[order], s=4,
                        cmap="coolwarm", vmin=-limit, vmax=limit)
    fig.colorbar(points, label="predicted - actual ($k); red = overestimate")
    ax.set(xlabel="longitude", ylabel="latitude", title="test: error by location")
    ax.set_aspect(1 / np.cos(np.radians(36)))
    fig.tight_layout()
    fig.savefig(plots_dir / "error_map.png", dpi=110)
    plt.close(fig)
