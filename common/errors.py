"""User-facing errors: one clear line, a non-zero exit on every rank, no hang."""

from __future__ import annotations

import os
import sys
import traceback
from collections.abc import Callable


class UserError(Exception):
    """A problem the user can fix (bad argument, missing or malformed file).

    Printed as a single ``error: ...`` line without a traceback. The message should name the
    file or argument and say what was expected.
    """


class NonFiniteLossError(UserError):
    """Training produced a NaN or infinite loss (``common.finite.FiniteLossWatch``)."""


def write_error_line(message: str, rank: int) -> None:
    """Print ``error: message`` to stderr, prefixed ``[rank N]`` on ranks other than 0."""
    prefix = f"[rank {rank}] " if rank else ""
    sys.stdout.flush()
    sys.stderr.flush()
    # One write per line: several ranks share the terminal, and print() sends the text and the
    # newline separately, so two ranks' lines could interleave.
    os.write(2, f"{prefix}error: {message}\n".encode())


def report(err: UserError) -> None:
    """Print ``err``'s one line on this rank, once however often it is called.

    ``common.dist.distributed`` calls it before leaving the process group: the peers notice a
    rank that leaves at once, fail, and may have the launcher stop this process before
    ``run_main`` would have printed the line.
    """
    if not getattr(err, "reported", False):
        write_error_line(str(err), int(os.environ.get("RANK", 0)))
        err.reported = True


def run_main(main: Callable[[], object]) -> None:
    """Run a program's ``main`` and turn failures into a prompt exit of this process.

    Success exits 0; a UserError prints one line and exits with status 2; anything else prints
    its traceback and exits with status 1. Exiting (rather than waiting in a collective) is what lets torchrun
    notice the failure and stop the other ranks within seconds. ``os._exit`` is used after
    flushing because a normal interpreter exit can block on a half-finished collective or on
    dataloader worker threads.
    """
    try:
        main()
        sys.stdout.flush()
        sys.stderr.flush()
        # Skip interpreter teardown: destructors of gloo's and the store's C++ threads can abort
        # a finished process ("terminate called without an active exception", seen once in
        # three suite runs), turning a complete run into a failed one. Every file is closed.
        os._exit(0)
    except UserError as err:
        report(err)
        os._exit(2)
    except KeyboardInterrupt:
        sys.stdout.flush()
        os._exit(130)
    except BaseException as err:  # noqa: BLE001 - the last line of defence: report and leave
        if isinstance(err, SystemExit):
            # argparse --help exits 0, a bad flag exits 2: keep those codes.
            code = err.code if isinstance(err.code, int) else (0 if err.code is None else 1)
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
        traceback.print_exc()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(1)
