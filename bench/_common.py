"""Shared by the bench scripts (run as `python bench/NAME.py`, so this folder is on sys.path)."""

from __future__ import annotations

import sys
import traceback


def run_main(main) -> None:
    """Run `main()` and exit with its code; any exception prints its traceback and exits 1."""
    try:
        sys.exit(main())
    except SystemExit:
        raise
    except Exception as e:  # noqa: BLE001 - a failed run must exit non-zero with the reason
        traceback.print_exc()
        print(f"FAILED: {type(e).__name__}: {e}", file=sys.stderr)
        sys.exit(1)
