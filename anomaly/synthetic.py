"""Small synthetic files in the UNSW-NB15 layouts, for tests and demos without the real data.

Normal flows and attacks differ the way they do in the real set (attacks: TTL 254, one-sided,
few packets, repeated sizes), so a detector has something to find in a few seconds.
"""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
import pandas as pd

from anomaly.data import PARTITION_COLUMNS, RAW_COLUMNS

ATTACKS = ("Generic", "Exploits", "Fuzzers", "DoS", "Reconnaissance")


def make_partition(n: int, seed: int = 0, attack_share: float = 0.5) -> pd.DataFrame:
    """``n`` rows with the 45 partition columns (``id`` first, ``label`` last)."""
    rng = np.random.default_rng(seed)
    attack = rng.random(n) < attack_share
    cat = np.where(attack, rng.choice(ATTACKS, n), "Normal")
    spkts = np.where(attack, rng.integers(1, 4, n), rng.integers(4, 60, n))
    dpkts = np.where(attack, rng.integers(0, 2, n), rng.integers(2, 60, n))
    sbytes = np.where(attack, rng.choice([200, 168, 564, 1064], n), spkts * rng.integers(40, 900, n))
    dbytes = np.where(dpkts > 0, dpkts * rng.integers(40, 1400, n), 0)
    dur = np.where(attack, rng.exponential(0.001, n), rng.exponential(1.0, n))
    frame = pd.DataFrame({c: rng.integers(0, 5, n).astype(float) for c in PARTITION_COLUMNS})
    frame["id"] = np.arange(1, n + 1)
    frame["dur"] = dur.round(6)
    frame["spkts"], frame["dpkts"], frame["sbytes"], frame["dbytes"] = spkts, dpkts, sbytes, dbytes
    frame["rate"] = ((spkts + dpkts) / np.maximum(dur, 1e-6)).round(3)
    frame["sttl"] = np.where(attack, 254, rng.choice([31, 62, 254], n, p=[0.5, 0.3, 0.2]))
    frame["dttl"] = np.where(attack, 0, rng.choice([29, 252], n))
    frame["sload"] = (sbytes * 8 / np.maximum(dur, 1e-6)).round(1)
    frame["dload"] = (dbytes * 8 / np.maximum(dur, 1e-6)).round(1)
    frame["smean"] = sbytes // np.maximum(spkts, 1)
    frame["dmean"] = dbytes // np.maximum(dpkts, 1)
    frame["swin"] = np.where(attack, 0, 255)
    frame["dwin"] = np.where(attack, 0, 255)
    frame["stcpb"] = rng.integers(0, 2**32, n)
    frame["dtcpb"] = rng.integers(0, 2**32, n)
    frame["ct_state_ttl"] = np.where(attack, 2, rng.choice([0, 1], n))
    frame["is_sm_ips_ports"] = 0
    frame["proto"] = np.where(attack, rng.choice(["udp", "tcp", "unas"], n), rng.choice(["tcp", "udp"], n))
    frame["service"] = np.where(attack, rng.choice(["dns", "-"], n), rng.choice(["-", "http", "dns", "ftp"], n))
    frame["state"] = np.where(attack, "INT", rng.choice(["FIN", "CON"], n))
    frame["attack_cat"] = cat
    frame["label"] = attack.astype(int)
    return frame[list(PARTITION_COLUMNS)]


def write_partition(frame: pd.DataFrame, path: Path, bom: bool = True, zip_name: str | None = None) -> Path:
    """Write like the real files: a BOM before the header, optionally inside a zip."""
    text = ("\ufeff" if bom else "") + frame.to_csv(index=False)
    path = Path(path)
    if zip_name is None:
        path.write_text(text, encoding="utf-8")
        return path
    archive = path.parent / zip_name
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr(path.name, text.encode("utf-8"))
    return archive


def make_raw(n: int, seed: int = 0, start_time: int = 1421927377) -> pd.DataFrame:
    """``n`` rows in the raw 49-column layout (no header), with ``stime``/``ltime``."""
    part = make_partition(n, seed)
    rng = np.random.default_rng(seed + 1)
    frame = part.copy()
    frame["srcip"] = "175.45.176." + pd.Series(rng.integers(0, 4, n)).astype(str)
    frame["sport"] = rng.integers(1024, 65535, n)
    frame["dstip"] = "149.171.126." + pd.Series(rng.integers(10, 19, n)).astype(str)
    frame["dsport"] = rng.choice([53, 80, 111], n)
    frame["stime"] = start_time + np.sort(rng.integers(0, 3600, n))
    frame["ltime"] = frame["stime"] + 1
    # Quirks of the raw files: blank for zero, blank attack_cat for normal rows, a plural spelling.
    frame["ct_flw_http_mthd"] = frame["ct_flw_http_mthd"].astype(int).astype(str).replace("0", "")
    frame["attack_cat"] = frame["attack_cat"].replace({"Normal": "", "DoS": " DoS "})
    return frame[list(RAW_COLUMNS)]


def write_raw(frame: pd.DataFrame, path: Path) -> Path:
    frame.to_csv(path, index=False, header=False)
    return Path(path)
