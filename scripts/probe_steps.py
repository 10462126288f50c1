"""Size a GPU run's schedule from a speed probe (scripts/gpu_continue_shapes.sh, scripts/gpu_decoder.sh).

    python scripts/probe_steps.py METRICS_JSONL BATCH SECONDS_LEFT RESERVE_S MIN_STEPS [SKIP_ROWS]

METRICS_JSONL is the probe run's metrics.jsonl, whose rows carry the cumulative images/s at their step. The
marginal rate between the first row kept (after SKIP_ROWS, e.g. 1 to leave out the start-up) and the last one gives
steps per second; with a single row, its cumulative rate (start-up included, so a lower bound). Prints the number
of steps that fill 85% of SECONDS_LEFT - RESERVE_S (at least MIN_STEPS) on stdout, and the rate on stderr.
"""

import json
import sys


def main(argv: list[str]) -> int:
    path, batch, left, reserve, least = argv[:5]
    skip = int(argv[5]) if len(argv) > 5 else 0
    batch, left, reserve, least = int(batch), float(left), float(reserve), int(least)
    rows = [json.loads(line) for line in open(path)]
    b = rows[-1]
    a = rows[min(skip, len(rows) - 1)]
    if a is b:
        rate = b["img_s"] / batch  # steps per second
    else:
        ta, tb = a["step"] * batch / a["img_s"], b["step"] * batch / b["img_s"]
        rate = (b["step"] - a["step"]) / max(1e-6, tb - ta)
    steps = int(0.85 * rate * (left - reserve))
    print(max(least, steps))
    print(f"probe: {rate:.2f} steps/s ({rate * batch:.0f} img/s) -> {steps} steps in {left:.0f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
