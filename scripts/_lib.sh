# Shared by the launch scripts: argument parsing and "print, then run".
# Usage inside a script: parse_launch_args "$@"; then use $PROGRAM, $DRY_RUN, "${PASS[@]}".
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DRY_RUN=0
PROGRAM=""
PASS=()

usage_programs() { echo "PROGRAM is one of: housing cifar anomaly (or a path to a train script)"; }

parse_launch_args() {
  while [[ $# -gt 0 ]]; do
    case "$1" in
      --dry-run) DRY_RUN=1; shift ;;
      -h|--help) usage; exit 0 ;;
      --) shift; PASS+=("$@"); break ;;
      *)
        if [[ -z "$PROGRAM" && "$1" != -* ]]; then PROGRAM="$1"; else PASS+=("$1"); fi
        shift ;;
    esac
  done
  if [[ -z "$PROGRAM" ]]; then usage >&2; exit 2; fi
  case "$PROGRAM" in
    housing|cifar|anomaly) SCRIPT="$REPO/$PROGRAM/train.py" ;;
    *) SCRIPT="$PROGRAM" ;;
  esac
  if [[ ! -f "$SCRIPT" ]]; then echo "error: no training script at $SCRIPT; $(usage_programs)" >&2; exit 2; fi
}

# Print the command (copy-pasteable), then run it unless --dry-run.
run() {
  printf '+'; printf ' %q' "$@"; printf '\n'
  if [[ "$DRY_RUN" == 0 ]]; then exec "$@"; fi
}
