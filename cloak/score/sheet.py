"""``--sheet``: a contact sheet (PNG, PIL only) — per subject a row of reference photos, then the
generated images in a grid with each image's scores under it, and the run's means in the header."""

from __future__ import annotations

from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

THUMB = 160  # px, square cells
COLUMNS = 6
MAX_REF = COLUMNS  # reference photos shown per subject
MAX_GEN = 48  # generated images shown per subject; the rest is counted in a note
PAD = 8
FONT_SIZE = 14
BG, INK, MUTED, RULE = (255, 255, 255), (20, 20, 20), (110, 110, 110), (210, 210, 210)


def _font(size: int = FONT_SIZE):
    return ImageFont.load_default(size=size)


def _fmt(v) -> str:
    if v is None:
        return "n/a"
    return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"


def _thumb(rgb) -> Image.Image:
    img = Image.fromarray(rgb)
    scale = THUMB / max(img.size)  # small images are enlarged too (pixels kept sharp), so every cell reads alike
    size = (max(1, round(img.width * scale)), max(1, round(img.height * scale)))
    img = img.resize(size, Image.LANCZOS if scale < 1 else Image.NEAREST)
    cell = Image.new("RGB", (THUMB, THUMB), (235, 235, 235))
    cell.paste(img, ((THUMB - img.width) // 2, (THUMB - img.height) // 2))
    return cell


def _clip_text(draw: ImageDraw.ImageDraw, text: str, font, width: int) -> str:
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "…", font=font) > width:
        text = text[:-1]
    return text + "…"


def contact_sheet(path: Path, subjects, metric_names: list[str], table: dict[str, dict]) -> Path:
    """Write the sheet to ``path`` (PNG) and return it."""
    font, bold = _font(), _font(FONT_SIZE + 4)
    line = FONT_SIZE + 4
    cell_w = THUMB + PAD
    width = PAD + COLUMNS * cell_w
    label_h = line  # file name under a thumbnail
    gen_cell_h = THUMB + label_h + line * len(metric_names) + PAD

    blocks = []  # (subject, shown refs, shown gens, header height, total height)
    for s in subjects:
        refs = (s.ref or [])[:MAX_REF]
        gens = s.images[:MAX_GEN]
        rows = -(-len(gens) // COLUMNS)
        header = 2 * line + PAD + (line if len(s.images) > MAX_GEN else 0)
        ref_h = (line + THUMB + label_h + PAD) if refs else 0
        blocks.append((s, refs, gens, header, header + ref_h + line + rows * gen_cell_h + PAD))
    title_h = 2 * line + 2 * PAD
    height = title_h + sum(b[-1] for b in blocks)
    sheet = Image.new("RGB", (width, height), BG)
    draw = ImageDraw.Draw(sheet)

    means = "   ".join(f"{m} {_fmt(table[m]['mean'])}" for m in metric_names)
    draw.text((PAD, PAD), "cloak score" + (" - mean over subjects" if len(subjects) > 1 else ""), font=bold, fill=INK)
    draw.text((PAD, PAD + line + 4), _clip_text(draw, means, font, width - 2 * PAD), font=font, fill=INK)
    y = title_h
    for s, refs, gens, header, total in blocks:
        draw.line([(PAD, y), (width - PAD, y)], fill=RULE, width=2)
        title = s.name if s.name is not None else str(s.gen_dir)
        draw.text((PAD, y + PAD), _clip_text(draw, title, bold, width - 2 * PAD), font=bold, fill=INK)
        sub = "   ".join(f"{m} {_fmt(s.table[m]['mean'])}" for m in metric_names)
        draw.text((PAD, y + PAD + line + 2), _clip_text(draw, sub, font, width - 2 * PAD), font=font, fill=MUTED)
        if len(s.images) > MAX_GEN:
            draw.text((PAD, y + PAD + 2 * line + 2), f"showing {MAX_GEN} of {len(s.images)} generated images",
                      font=font, fill=MUTED)
        y += header
        if refs:
            draw.text((PAD, y), "reference", font=font, fill=MUTED)
            y += line
            for i, r in enumerate(refs):
                x = PAD + i * cell_w
                sheet.paste(_thumb(r.rgb), (x, y))
                draw.text((x, y + THUMB + 2), _clip_text(draw, r.name, font, THUMB), font=font, fill=MUTED)
            y += THUMB + label_h + PAD
        draw.text((PAD, y), "generated", font=font, fill=MUTED)
        y += line
        for i, img in enumerate(gens):
            x = PAD + (i % COLUMNS) * cell_w
            top = y + (i // COLUMNS) * gen_cell_h
            sheet.paste(_thumb(img.rgb), (x, top))
            draw.text((x, top + THUMB + 2), _clip_text(draw, img.name, font, THUMB), font=font, fill=MUTED)
            for k, m in enumerate(metric_names):  # gens is a prefix of s.images: same index
                text = f"{m} {_fmt(s.values[m][i])}"
                draw.text((x, top + THUMB + label_h + k * line + 2), _clip_text(draw, text, font, THUMB), font=font,
                          fill=INK)
        y += -(-len(gens) // COLUMNS) * gen_cell_h + PAD
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    sheet.save(tmp, format="PNG")
    tmp.replace(path)
    return path
