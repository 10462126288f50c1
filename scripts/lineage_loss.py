"""The training loss of a model trained in several runs of different batch sizes, on one axis of images seen
(README's docs/shapes-v1-loss.png).

    python scripts/lineage_loss.py OUT.png METRICS:BATCH[:LAST_STEP] ...

Each METRICS is a run's metrics.jsonl (rows {"step", "loss"}); BATCH its images per step (all processes);
LAST_STEP drops the rows after the step the next run started from. Rows repeated by a resume keep the last one.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sdstack.train.plots import loss_curve, save_png  # noqa: E402


def lineage(specs: list[str]) -> list[tuple[int, float]]:
    points, offset = [], 0
    for spec in specs:
        path, batch, *last = spec.split(":")
        rows = {}
        for line in Path(path).read_text().splitlines():
            row = json.loads(line)
            if not last or row["step"] <= int(last[0]):
                rows[row["step"]] = row["loss"]
        end = max(rows)
        points += [((offset + s * int(batch)) // 1000, v) for s, v in sorted(rows.items())]
        offset += end * int(batch)
    return points


if __name__ == "__main__":
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    pts = lineage(sys.argv[2:])
    save_png(loss_curve(pts, title=f"shapes-v1 training loss ({len(sys.argv) - 2} runs: batch 32, then 256)",
                        x_label="k images"), sys.argv[1])
    print(f"{len(pts)} points, {pts[-1][0]}k images -> {sys.argv[1]}")
