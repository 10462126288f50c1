"""Reports of an evaluation (`sdstack.eval.oracle.evaluate` summaries): a text table per suite, a JSON file, and
a contact sheet (a PNG grid of the generated images, one row per prompt, with a red frame and cross on each
image that failed a claim)."""

from __future__ import annotations

import json
import os
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont
from ..fsio import atomic_path

CLAIM_ORDER = ("shape", "colour", "count", "size", "place", "relation", "background")
FAIL_COLOUR = (230, 20, 20)
PASS_COLOUR = (40, 170, 60)


def format_table(summary: dict) -> str:
    """A plain-text table of one suite: each kind of claim, then every claim right ('all correct')."""
    claims = summary["claims"]
    kinds = [k for k in CLAIM_ORDER if k in claims] + sorted(k for k in claims if k not in CLAIM_ORDER)
    lines = [f"suite {summary['suite']}: {summary['n_prompts']} prompts, {summary['n_images']} images",
             f"  {'claim':<12}{'accuracy':>9}"]
    lines += [f"  {k:<12}{claims[k]:>9.1%}" for k in kinds]
    lines.append(f"  {'all correct':<12}{summary['accuracy']:>9.1%}")
    by_shape = summary.get("shape_by_shape")
    if by_shape:  # which shapes the model draws right (the shape claim, per shape the prompt asks for)
        lines.append("  shape right by shape: " + ", ".join(f"{k} {v:.0%}" for k, v in by_shape.items()))
    by_colour = summary.get("colour_by_colour")
    if by_colour:  # which colours the model paints right (the colour claim, per colour the prompt asks for)
        lines.append("  colour right by colour: " + ", ".join(f"{k} {v:.0%}" for k, v in by_colour.items()))
    return "\n".join(lines)


def format_overview(summaries: list[dict]) -> str:
    """One line per suite: the share of images with every claim right (the GenEval-style score)."""
    lines = [f"{'suite':<14}{'images':>7}{'accuracy':>10}"]
    lines += [f"{s['suite']:<14}{s['n_images']:>7}{s['accuracy']:>10.1%}" for s in summaries]
    if summaries:
        mean = sum(s["accuracy"] for s in summaries) / len(summaries)
        lines.append(f"{'mean':<14}{'':>7}{mean:>10.1%}")
    return "\n".join(lines)


def _atomic_write(path: Path, write) -> None:
    with atomic_path(path) as tmp:
        write(tmp)


def write_json(summaries: dict | list[dict], path: str | os.PathLike) -> Path:
    """Write a summary (or a list of them) as JSON, atomically (temp file, then rename)."""
    path = Path(path)

    def write(tmp):
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(summaries, f, indent=1)
            f.write("\n")

    _atomic_write(path, write)
    return path


def _mark_failure(draw: ImageDraw.ImageDraw, box: tuple[int, int, int, int]) -> None:
    x0, y0, x1, y1 = box
    width = max(2, (x1 - x0) // 32)
    draw.rectangle(box, outline=FAIL_COLOUR, width=width)
    s = max(8, (x1 - x0) // 6)  # a cross in the top-right corner
    cx0, cy0 = x1 - s - width, y0 + width
    draw.rectangle((cx0, cy0, cx0 + s, cy0 + s), fill=(255, 255, 255))
    draw.line((cx0 + 2, cy0 + 2, cx0 + s - 2, cy0 + s - 2), fill=FAIL_COLOUR, width=max(1, s // 5))
    draw.line((cx0 + 2, cy0 + s - 2, cx0 + s - 2, cy0 + 2), fill=FAIL_COLOUR, width=max(1, s // 5))


def contact_sheet(images: list, results: list[dict], *, columns: int | None = None, cell: int = 128,
                  label_height: int = 14) -> Image.Image:
    """Grid of `images` (one per row of `results`, same order), each scaled to `cell` pixels, with the prompt id
    under it and a red frame and cross on each failure. `columns` defaults to the number of seeds per prompt."""
    if len(images) != len(results):
        raise ValueError(f"{len(images)} images for {len(results)} results")
    if columns is None:
        columns = max((r.get("seed", 0) for r in results), default=0) + 1
    rows = max(1, -(-len(images) // columns))
    pad = 2
    sheet = Image.new("RGB", (columns * (cell + pad) + pad, rows * (cell + label_height + pad) + pad), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    font = ImageFont.load_default()
    for k, (image, row) in enumerate(zip(images, results)):
        x = pad + (k % columns) * (cell + pad)
        y = pad + (k // columns) * (cell + label_height + pad)
        sheet.paste(image.convert("RGB").resize((cell, cell), Image.Resampling.NEAREST), (x, y))
        if not row["all_correct"]:
            _mark_failure(draw, (x, y, x + cell - 1, y + cell - 1))
        colour = PASS_COLOUR if row["all_correct"] else FAIL_COLOUR
        draw.text((x + 1, y + cell + 1), str(row.get("id", k))[-20:], fill=colour, font=font)
    return sheet


def save_contact_sheet(images: list, results: list[dict], path: str | os.PathLike, **kwargs) -> Path:
    """`contact_sheet` written as PNG, atomically."""
    sheet = contact_sheet(images, results, **kwargs)
    path = Path(path)
    _atomic_write(path, lambda tmp: sheet.save(tmp, format="PNG"))
    return path


def save_report(summary: dict, images: list, out_dir: str | os.PathLike) -> dict[str, Path]:
    """Write '<suite>.json' and the contact sheet '<suite>.png' into `out_dir`. `images` follow the order of
    `summary['results']` (prompt by prompt, seed by seed: `[im for ims in images_per_prompt(...) for im in ims]`)."""
    out = Path(out_dir)
    stem = summary["suite"].replace("/", "_")
    return {"json": write_json(summary, out / f"{stem}.json"),
            "contact_sheet": save_contact_sheet(images, summary["results"], out / f"{stem}.png")}
