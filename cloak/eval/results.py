"""What ``cloak eval`` leaves in OUT/: results.csv, results.json (schema ``cloak.eval/1``, docs/eval.md),
results.md (the paper's table), results.png (a chart) and sheets/<identity>.png (contact sheets).

Every figure is read back from the cells' own score reports, so the results can be rebuilt from the
folders alone and match what ``cloak score`` printed for each cell.
"""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path
from typing import Any

from cloak.eval.plan import Plan

SCHEMA = "cloak.eval/1"
CSV_FIELDS = ["protect", "purify", "attack", "identity", "seed", "metric", "value", "backend", "status", "error",
              "cell_dir"]


def cell_scores(score_dir: Path) -> tuple[dict[str, float | None], dict[str, str | None]]:
    """Each metric's mean for the cell and the backend that computed it, from its score report."""
    report = json.loads((Path(score_dir) / "report.json").read_text(encoding="utf-8"))
    metrics = report.get("summary", {}).get("metrics", {})
    scores = {m: v.get("mean") for m, v in metrics.items()}
    backends = {m: (v.get("extras") or {}).get("backend") for m, v in metrics.items()}
    return scores, backends


# A metric's ``lower_better`` is the protection's direction for the identity metrics (a lower ISM: the
# attacker's images look less like the person) and the image-quality direction for the quality metrics
# (a lower BRISQUE: a better image, hence a weaker protection). The table needs the protection's.
IDENTITY_METRICS = {"fdfr", "ism", "ims"}
QUALITY_METRICS = {"brisque", "niqe", "serfiq", "liqe", "clipiqa", "clipiqa-c"}


def protects_lower(name: str, lower_better: bool) -> bool | None:
    """True: a lower value means a stronger protection; None: the metric says nothing about protection
    (full-reference distances: generated images are not pixel copies of the reference)."""
    if name in IDENTITY_METRICS:
        return lower_better
    if name in QUALITY_METRICS:
        return not lower_better
    return None


def metric_info(plan: Plan) -> dict[str, dict[str, Any]]:
    from cloak.score import SCORE

    info = {}
    for m in plan.metrics:
        cls = SCORE.get(m.name)
        info[m.name] = {"lower_better": bool(cls.lower_better),
                        "protects_lower": protects_lower(m.name, cls.lower_better), "range": list(cls.range),
                        "label": m.label, "options": m.options}
    return info


def _arrow(info: dict[str, Any]) -> str:
    return {True: "↓", False: "↑", None: ""}[info["protects_lower"]]


def _mean_std(values: list[float]) -> tuple[float | None, float | None]:
    values = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not values:
        return None, None
    mean = sum(values) / len(values)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / len(values))  # population std, as cloak score
    return mean, std


def aggregate(plan: Plan, cells: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (protect, purify, attack, metric): mean ± std over identities (and seeds) of the cells'
    means, with n the number of cells that gave a value out of those planned."""
    rows = []
    for a in plan.attack:
        for p in plan.protect:
            for q in plan.purify:
                group = [c for c in cells if (c["protect"], c["purify"], c["attack"]) == (p.label, q.label, a.label)]
                for m in plan.metrics:
                    values = [c["scores"].get(m.name) for c in group if c["status"] == "ok"]
                    mean, std = _mean_std(values)
                    rows.append({"protect": p.label, "purify": q.label, "attack": a.label, "metric": m.name,
                                 "mean": mean, "std": std, "n": sum(1 for v in values if v is not None),
                                 "planned": len(group)})
    return rows


def backends(cells: list[dict[str, Any]]) -> dict[str, str | None]:
    found: dict[str, set] = {}
    for c in cells:
        for m, b in (c.get("backends") or {}).items():
            if b:
                found.setdefault(m, set()).add(b)
    return {m: ", ".join(sorted(b)) for m, b in found.items()}


def _best(rows: list[dict[str, Any]], lower_better: bool | None) -> set[int]:
    defined = [(i, r["mean"]) for i, r in enumerate(rows) if r["mean"] is not None]
    if not defined or lower_better is None:
        return set()
    target = (min if lower_better else max)(v for _, v in defined)
    return {i for i, v in defined if v == target}


def markdown(plan: Plan, table: list[dict[str, Any]], info: dict[str, dict], names: dict[str, str | None],
             n_identities: int) -> str:
    """The paper's table: one per attack; rows protect × purify; mean ± std over identities; the best value
    for the protection in each column in bold (↑: higher protects better, ↓: lower does; no arrow: the
    metric does not measure protection, nothing marked)."""
    out = []
    for a in plan.attack:
        rows_a = [r for r in table if r["attack"] == a.label]
        header = ["protect", "purify"]
        for m in plan.metrics:
            backend = names.get(m.name)
            header.append(f"{m.label.upper()} {_arrow(info[m.name])}".strip() + (f" ({backend})" if backend else ""))
        lines = [f"attack **{a.label}** · mean ± std over {n_identities} identit{'y' if n_identities == 1 else 'ies'}"
                 f"{f' × {len(plan.seeds)} seeds' if len(plan.seeds) > 1 else ''}",
                 "", "| " + " | ".join(header) + " |",
                 "|" + "|".join(["---"] * 2 + ["---:"] * len(plan.metrics)) + "|"]
        best = {m.name: _best([r for r in rows_a if r["metric"] == m.name], info[m.name]["protects_lower"])
                for m in plan.metrics}
        k = 0
        for p in plan.protect:
            for q in plan.purify:
                cells = [p.label, q.label]
                for m in plan.metrics:
                    rows_m = [r for r in rows_a if r["metric"] == m.name]
                    r = rows_m[k]
                    if r["mean"] is None:
                        text = "—"
                    else:
                        text = f"{r['mean']:.3f} ± {r['std']:.3f}"
                        if k in best[m.name]:
                            text = f"**{text}**"
                    if r["n"] < r["planned"]:
                        text += f" (n={r['n']}/{r['planned']})"
                    cells.append(text)
                lines.append("| " + " | ".join(cells) + " |")
                k += 1
        out.append("\n".join(lines))
    note = ("bold: the best value for the protection in each column (↑ higher protects better, ↓ lower does); "
            "in brackets: the backend of each face metric")
    return "\n\n".join(out) + "\n\n" + note + "\n"


def write_csv(path: Path, plan: Plan, cells: list[dict[str, Any]]) -> None:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=CSV_FIELDS, lineterminator="\n")
    writer.writeheader()
    for c in cells:
        for m in plan.metrics:
            value = (c.get("scores") or {}).get(m.name)
            writer.writerow({"protect": c["protect"], "purify": c["purify"], "attack": c["attack"],
                             "identity": c["identity"], "seed": c["seed"], "metric": m.name,
                             "value": "" if value is None else repr(float(value)),
                             "backend": (c.get("backends") or {}).get(m.name) or "", "status": c["status"],
                             "error": c.get("error", ""), "cell_dir": c["dir"]})
    path.write_text(buffer.getvalue(), encoding="utf-8")


def chart(path: Path, plan: Plan, table: list[dict[str, Any]], info: dict[str, dict]) -> str:
    """One panel per metric (a row of panels per attack): bars per protection, grouped by purifier, with
    the std over identities as error bars. matplotlib when installed, PIL otherwise."""
    try:
        import matplotlib

        matplotlib.use("Agg", force=True)
        import matplotlib.pyplot as plt
    except ImportError:
        return _chart_pil(path, plan, table, info)
    rows, cols = len(plan.attack), len(plan.metrics)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 + 2.6 * cols, 2.8 * rows + 0.6), squeeze=False)
    width = 0.8 / max(1, len(plan.purify))
    colours = plt.get_cmap("tab10")
    for i, a in enumerate(plan.attack):
        for j, m in enumerate(plan.metrics):
            ax = axes[i][j]
            for k, q in enumerate(plan.purify):
                xs, ys, es = [], [], []
                for x, p in enumerate(plan.protect):
                    r = next(r for r in table if (r["attack"], r["protect"], r["purify"], r["metric"]) ==
                             (a.label, p.label, q.label, m.name))
                    xs.append(x + (k - (len(plan.purify) - 1) / 2) * width)
                    ys.append(r["mean"] if r["mean"] is not None else float("nan"))
                    es.append(r["std"] or 0.0)
                ax.bar(xs, ys, width, yerr=es, capsize=2, label=f"purify {q.label}", color=colours(k % 10))
            ax.set_xticks(range(len(plan.protect)), [p.label for p in plan.protect], rotation=20, ha="right",
                          fontsize=8)
            ax.set_title(f"{m.label.upper()} {_arrow(info[m.name])} · {a.label}", fontsize=9)
            ax.tick_params(axis="y", labelsize=8)
    axes[0][-1].legend(fontsize=7, loc="best")
    fig.suptitle("protection (bars) × purification (colours); ↑/↓: the direction that protects", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return "matplotlib"


def _chart_pil(path: Path, plan: Plan, table: list[dict[str, Any]], info: dict[str, dict]) -> str:
    from PIL import Image, ImageDraw

    pw, ph, pad = 260, 200, 30
    rows, cols = len(plan.attack), len(plan.metrics)
    img = Image.new("RGB", (cols * pw, rows * ph), "white")
    draw = ImageDraw.Draw(img)
    palette = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75)]
    for i, a in enumerate(plan.attack):
        for j, m in enumerate(plan.metrics):
            x0, y0 = j * pw, i * ph
            rows_m = [r for r in table if r["attack"] == a.label and r["metric"] == m.name and r["mean"] is not None]
            top = max([abs(r["mean"]) + (r["std"] or 0) for r in rows_m] or [1.0]) or 1.0
            arrow = {True: " (lower protects)", False: " (higher protects)", None: ""}[info[m.name]["protects_lower"]]
            draw.text((x0 + 5, y0 + 3), f"{m.label.upper()}{arrow} {a.label}", fill="black")
            slot = (pw - 2 * pad) / max(1, len(plan.protect))
            bar = slot * 0.8 / max(1, len(plan.purify))
            base = y0 + ph - pad
            for x, p in enumerate(plan.protect):
                for k, q in enumerate(plan.purify):
                    r = next((r for r in rows_m if r["protect"] == p.label and r["purify"] == q.label), None)
                    if r is None:
                        continue
                    left = x0 + pad + x * slot + k * bar
                    height = (ph - 2 * pad - 10) * abs(r["mean"]) / top
                    draw.rectangle([left, base - height, left + bar - 2, base], fill=palette[k % len(palette)])
                draw.text((x0 + pad + x * slot, base + 4), p.label[:12], fill="black")
    img.save(path)
    return "pil"


def contact_sheets(out: Path, plan: Plan, cells: list[dict[str, Any]]) -> list[str]:
    """sheets/<identity>.png: one row per cell (input, protected, purified, then generated images)."""
    from PIL import Image, ImageDraw

    from cloak.io.images import list_images

    thumb, label_w, gens = 80, 270, 3
    written = []
    sheets = out / "sheets"
    sheets.mkdir(exist_ok=True)
    for ident in plan.identities:
        mine = [c for c in cells if c["identity"] == ident.name]
        if not mine:
            continue
        sheet = Image.new("RGB", (label_w + thumb * (3 + gens), 16 + thumb * len(mine)), "white")
        draw = ImageDraw.Draw(sheet)
        for k, title in enumerate(["input", "protected", "purified", "generated"]):
            draw.text((label_w + k * thumb + 3, 2), title, fill="black")
        for row, c in enumerate(mine):
            y = 16 + row * thumb
            text = f"{c['protect']} / {c['purify']} / {c['attack']}\n{ident.name} seed {c['seed']}: {c['status']}"
            if c["status"] == "ok":
                text += "\n" + " ".join(f"{m}={v:.3g}" for m, v in c["scores"].items() if v is not None)
            draw.multiline_text((4, y + 4), text, fill="black" if c["status"] == "ok" else (200, 0, 0))
            steps = c["steps"]
            folders = [ident.protect, Path(steps["protect"]["dir"]) if "protect" in steps else ident.protect,
                       Path(steps["purify"]["dir"]) if "purify" in steps else
                       (Path(steps["protect"]["dir"]) if "protect" in steps else ident.protect)]
            pictures = []
            for folder in folders:
                found = list_images(folder) if folder.is_dir() else []
                pictures.append(found[0] if found else None)
            gen = Path(steps["attack"]["dir"]) / "gen"
            pictures += (list_images(gen) if gen.is_dir() else [])[:gens]
            for k, picture in enumerate(pictures):
                if picture is None:
                    continue
                try:
                    with Image.open(picture) as im:
                        im = im.convert("RGB")
                        im.thumbnail((thumb - 2, thumb - 2))
                        sheet.paste(im, (label_w + k * thumb + 1, y + 1))
                except OSError:  # an unreadable input (that cell failed on it): an empty square
                    draw.rectangle([label_w + k * thumb + 1, y + 1, label_w + (k + 1) * thumb - 2, y + thumb - 2],
                                   outline=(200, 0, 0))
        path = sheets / f"{ident.name}.png"
        sheet.save(path)
        written.append(str(path))
    return written


def write_all(plan: Plan, out: Path, cells: list[dict[str, Any]], *, executor: str) -> tuple[dict[str, str], str]:
    """Write every results file; return their paths and the markdown table."""
    from cloak import __version__
    from cloak.io.report import now_iso

    out.mkdir(parents=True, exist_ok=True)
    info = metric_info(plan)
    table = aggregate(plan, cells)
    names = backends(cells)
    for m, backend in names.items():
        info[m]["backend"] = backend
    n_ids = len(plan.identities)
    md = markdown(plan, table, info, names, n_ids)
    files = {"csv": str(out / "results.csv"), "json": str(out / "results.json"), "md": str(out / "results.md"),
             "png": str(out / "results.png")}
    write_csv(out / "results.csv", plan, cells)
    (out / "results.md").write_text(f"# cloak eval: {plan.path.name}\n\n{md}", encoding="utf-8")
    drawn = chart(out / "results.png", plan, table, info)
    sheets = contact_sheets(out, plan, [c for c in cells if c["status"] != "pending"])
    document = {
        "schema": SCHEMA, "cloak": __version__, "written": now_iso(), "executor": executor,
        "plan": {"path": str(plan.path), "sha256": plan.sha256},
        "axes": {"protect": [p.label for p in plan.protect], "purify": [q.label for q in plan.purify],
                 "attack": [a.label for a in plan.attack], "metrics": [m.name for m in plan.metrics],
                 "identities": [i.name for i in plan.identities], "seeds": plan.seeds},
        "metrics": info,
        "counts": {s: sum(1 for c in cells if c["status"] == s) for s in ("ok", "failed", "pending")},
        "table": table, "cells": cells,
        "files": {**files, "sheets": sheets, "chart_backend": drawn},
    }
    (out / "results.json").write_text(json.dumps(document, indent=1, default=str) + "\n", encoding="utf-8")
    return {**files, "sheets": sheets}, md
