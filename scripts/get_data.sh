#!/usr/bin/env bash
# Put the three datasets in DIR (default: data/), with the programs' own download code:
#   scripts/get_data.sh [--dry-run] [DIR]
# housing: downloaded and SHA-256 checked; CIFAR-10: torchvision's archive, SHA-256 checked;
# UNSW-NB15: has no unauthenticated link, so this prints where to get it and what to name it.
set -euo pipefail
REPO="$(cd "$(dirname "$0")/.." && pwd)"
DRY_RUN=0
if [[ "${1:-}" == "--dry-run" ]]; then DRY_RUN=1; shift; fi
if [[ "${1:-}" == "-h" || "${1:-}" == "--help" ]]; then sed -n '2,5p' "$0" | sed 's/^# \{0,1\}//'; exit 0; fi
DIR="${1:-data}"

run_python() {
  printf '+ python -c %q\n' "$1"
  if [[ "$DRY_RUN" == 0 ]]; then (cd "$REPO" && python -c "$1"); fi
}

run_python "from pathlib import Path; from housing.data import locate_csv; print('housing:', locate_csv(Path('$DIR')))"
run_python "from pathlib import Path; from cifar.data import find_source, download_archive; d = Path('$DIR'); print('cifar:', find_source(d) or download_archive(d))"
# anomaly/train.py reads UNSW files as CSVs or inside any zip; it validates them when it runs.
run_python "from pathlib import Path; from anomaly.data import WHERE_TO_GET; found = sorted(p.name for p in Path('$DIR').glob('UNSW*')); print('anomaly:', found or WHERE_TO_GET)"
