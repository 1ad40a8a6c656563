"""A job's results as one self-contained HTML page: summary, image cards with thumbnails, rejections (pure, no I/O).

Which images get a card and the figures above them are computed in producer/report_figures.py.
"""

from __future__ import annotations

import base64
import html
import io
import warnings
from collections.abc import Mapping, Sequence

from PIL import Image, ImageOps

from producer.report_figures import Selection, Summary, best_detections, ranked, select_images, summarize
from worker.contracts import DetectionDoc, ResultDoc
from worker.jobs import JobSpec, JobStatus

# Nothing may be fetched: images are data: URIs, styles inline, and there is no script at all.
CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'; base-uri 'none'; form-action 'none'"
# The documented bound on the page: cards stop being added before it is reached, whatever the job's size.
MAX_REPORT_BYTES = 25_000_000
# Rejections listed one per row (all are counted by code above the table).
MAX_REJECTIONS = 1000
THUMB_LONG_SIDE = 160
# A thumbnail that stays over this at the lowest quality is left out (the card says "no preview").
MAX_THUMB_BYTES = 20_000
THUMB_QUALITIES = (75, 60, 45, 30)
LABELS_PER_CARD = 5
BOXES_PER_CARD = 20
MAX_MESSAGE_CHARS = 500
# Room kept for the notes written after the cards are counted.
NOTES_RESERVE_BYTES = 4_000
BOX_COLOURS = ("#e4572e", "#17bebb", "#ffc914", "#76b041", "#9c6ade")

STYLE = """
*{box-sizing:border-box}
body{margin:0;padding:24px;font:14px/1.4 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;color:#1f2328;
background:#f6f8fa}
h1{font-size:22px;margin:0 0 4px}h2{font-size:17px;margin:28px 0 10px}
.sub{color:#57606a;margin:0 0 16px;overflow-wrap:anywhere}
.stats{display:grid;grid-template-columns:repeat(auto-fill,minmax(130px,1fr));gap:10px}
.stat{background:#fff;border:1px solid #d0d7de;border-radius:8px;padding:10px 12px}
.stat b{display:block;font-size:20px}.stat span{color:#57606a;font-size:12px}
.panels{display:grid;grid-template-columns:repeat(auto-fit,minmax(320px,1fr));gap:12px;margin-top:12px}
.panel{background:#fff;border:1px solid #d0d7de;border-radius:8px;padding:12px}
.panel h3{font-size:13px;margin:0 0 8px;color:#57606a;font-weight:600}
.hist{display:flex;align-items:flex-end;gap:4px;height:120px;margin-top:22px;border-bottom:1px solid #d0d7de}
.hist div{flex:1;background:#0969da;border-radius:3px 3px 0 0;min-height:1px;position:relative}
.hist div span{position:absolute;top:-17px;left:0;right:0;text-align:center;font-size:11px;color:#57606a}
.axis{display:flex;gap:4px;font-size:11px;color:#57606a}.axis span{flex:1;text-align:center}
.freq{width:100%;border-collapse:collapse;font-size:13px}.freq td{padding:2px 4px;vertical-align:middle}
.freq td:first-child{width:45%;overflow-wrap:anywhere}.freq td:last-child{width:3em;text-align:right}
.bar{height:10px;background:#54aeff;border-radius:2px}
.note{background:#fff8c5;border:1px solid #d4a72c;border-radius:8px;padding:8px 12px;margin:12px 0}
.grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(190px,1fr));gap:12px}
.card{margin:0;background:#fff;border:1px solid #d0d7de;border-radius:8px;overflow:hidden}
.pic{height:172px;display:flex;align-items:center;justify-content:center;background:#eaeef2}
.frame{position:relative;line-height:0}
.frame img{display:block;max-width:160px;max-height:160px}
.none{color:#8c959f;font-size:12px}
.box{position:absolute;border:2px solid;border-radius:2px}
.box span{position:absolute;left:-2px;top:-2px;font:10px/14px system-ui,sans-serif;color:#fff;padding:0 3px;
white-space:nowrap;max-width:150px;overflow:hidden;text-overflow:ellipsis}
figcaption{padding:8px 10px}
.name{font-weight:600;font-size:12px;overflow-wrap:anywhere;margin-bottom:4px}
.labels{list-style:none;margin:0;padding:0;font-size:12px}
.labels li{display:flex;justify-content:space-between;gap:6px}
.labels li:first-child{font-weight:600}
.labels .lab{overflow-wrap:anywhere}.labels .sc{color:#57606a;font-variant-numeric:tabular-nums}
table.rej{width:100%;border-collapse:collapse;background:#fff;border:1px solid #d0d7de;font-size:13px}
.rej th,.rej td{text-align:left;padding:6px 8px;border-bottom:1px solid #eaeef2;vertical-align:top;
overflow-wrap:anywhere}
.rej th:first-child{width:38%}.rej th:nth-child(2){width:14%}
.rej code{background:#ffebe9;color:#cf222e;padding:1px 5px;border-radius:4px}
.muted{color:#57606a}
"""


def esc(text: str) -> str:
    """HTML-escaped text, quotes included: blob names and labels are user data."""
    return html.escape(text, quote=True)


def make_thumbnail(data: bytes, long_side: int = THUMB_LONG_SIDE, max_bytes: int = MAX_THUMB_BYTES) -> bytes | None:
    """A small upright JPEG of the image (draft-mode decode, EXIF orientation applied), or None if it cannot be."""
    try:
        with warnings.catch_warnings():
            # A large photo is fine here: draft mode decodes it at 1/8 scale.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as image:
                image.draft("RGB", (long_side, long_side))
                upright = ImageOps.exif_transpose(image).convert("RGB")
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
        return None
    upright.thumbnail((long_side, long_side), Image.Resampling.LANCZOS)
    for quality in THUMB_QUALITIES:
        encoded = _jpeg(upright, quality)
        if len(encoded) <= max_bytes:
            return encoded
    return None


def _jpeg(image: Image.Image, quality: int) -> bytes:
    """The image encoded as a JPEG of this quality."""
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality, optimize=True)
    return buffer.getvalue()


def _duration_text(seconds: float | None) -> str:
    """A duration the way a person reads it: 40 ms, 12.3 s, 4 min 05 s, 2 h 10 min."""
    if seconds is None:
        return "—"
    if seconds < 0.1:
        return f"{seconds * 1000:.0f} ms"
    if seconds < 120:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min" if hours else f"{minutes} min {secs:02d} s"


def _stat(value: str, caption: str) -> str:
    """One tile of the figures row."""
    return f'<div class="stat"><b>{esc(value)}</b><span>{esc(caption)}</span></div>'


def render_stats(status: JobStatus, summary: Summary) -> str:
    """The row of figures: counts, duration, rate and score latency."""
    rate = f"{summary.images_per_s:.1f}" if summary.images_per_s is not None else "—"
    tiles = [
        _stat(str(status.listed), "listed"), _stat(str(status.ok), "ok"), _stat(str(status.rejected), "rejected"),
        _stat(_duration_text(summary.duration_s), "first → last result"), _stat(rate, "images/s"),
    ]
    if status.pending or status.retrying:
        tiles += [_stat(str(status.pending), "pending"), _stat(str(status.retrying), "retrying")]
    tiles += [_stat(f"{summary.latency_ms[name]:.0f} ms" if name in summary.latency_ms else "—", f"score {name}")
              for name in ("p50", "p90", "p99")]
    return f'<div class="stats">{"".join(tiles)}</div>'


def render_histogram(counts: Sequence[int]) -> str:
    """Top-1 scores as CSS bars over 0..1."""
    peak = max(counts, default=0) or 1
    bars = "".join(
        f'<div style="height:{100 * count / peak:.1f}%" title="{count}"><span>{count or ""}</span></div>'
        for count in counts
    )
    step = 1 / len(counts) if counts else 1
    axis = "".join(f"<span>{index * step:.1f}</span>" for index in range(len(counts)))
    return f'<div class="panel"><h3>Top-1 score</h3><div class="hist">{bars}</div><div class="axis">{axis}</div></div>'


def render_frequent(frequent: Sequence[tuple[str, int]], title: str) -> str:
    """A ranked list of names with counts and proportional bars."""
    peak = max((count for _, count in frequent), default=0) or 1
    rows = "".join(
        f'<tr><td>{esc(name)}</td><td><div class="bar" style="width:{100 * count / peak:.1f}%"></div></td>'
        f"<td>{count}</td></tr>"
        for name, count in frequent
    ) or '<tr><td class="muted">none</td></tr>'
    return f'<div class="panel"><h3>{esc(title)}</h3><table class="freq">{rows}</table></div>'


def _clamp(value: float) -> float:
    """A box coordinate kept inside the image."""
    return min(1.0, max(0.0, value))


def render_box(detection: DetectionDoc, index: int) -> str:
    """One detection as an absolutely positioned outline over the thumbnail (`box` is y1, x1, y2, x2 fractions)."""
    if len(detection.box) != 4:
        return ""
    y1, x1, y2, x2 = (_clamp(value) for value in detection.box)
    colour = BOX_COLOURS[index % len(BOX_COLOURS)]
    return (
        f'<div class="box" style="left:{100 * x1:.2f}%;top:{100 * y1:.2f}%;width:{100 * max(0.0, x2 - x1):.2f}%;'
        f'height:{100 * max(0.0, y2 - y1):.2f}%;border-color:{colour}">'
        f'<span style="background:{colour}">{esc(detection.label)} {detection.score:.2f}</span></div>'
    )


def render_card(doc: ResultDoc, thumbnail: bytes | None) -> str:
    """One scored image: thumbnail (with detection boxes), name, top labels and scores."""
    if thumbnail is None:
        picture = '<span class="none">no preview: source blob gone or changed</span>'
    else:
        detections = best_detections(doc, BOXES_PER_CARD)
        boxes = "".join(render_box(detection, index) for index, detection in enumerate(detections))
        uri = "data:image/jpeg;base64," + base64.b64encode(thumbnail).decode("ascii")
        picture = f'<div class="frame"><img src="{uri}" alt="">{boxes}</div>'
    labels = "".join(
        f'<li><span class="lab">{esc(label)}</span><span class="sc">{score:.3f}</span></li>'
        for label, score in ranked(doc, LABELS_PER_CARD)
    ) or '<li class="muted">no labels</li>'
    return (
        f'<figure class="card"><div class="pic">{picture}</div><figcaption>'
        f'<div class="name">{esc(doc.source.blob)}</div><ol class="labels">{labels}</ol></figcaption></figure>\n'
    )


def render_rejections(docs: Sequence[ResultDoc], limit: int = MAX_REJECTIONS) -> tuple[str, int]:
    """The rejected images' table (the first `limit` by name) and how many rows it left out."""
    rejected = sorted((doc for doc in docs if doc.status == "rejected"), key=lambda doc: doc.source.blob)
    if not rejected:
        return '<p class="muted">No image was rejected.</p>', 0
    rows = "".join(
        f'<tr class="rejected"><td class="name">{esc(doc.source.blob)}</td>'
        f"<td><code>{esc(doc.error.code if doc.error else '?')}</code></td>"
        f"<td>{esc((doc.error.message if doc.error else '')[:MAX_MESSAGE_CHARS])}</td></tr>\n"
        for doc in rejected[:limit]
    )
    table = f'<table class="rej"><thead><tr><th>image</th><th>code</th><th>message</th></tr></thead>{rows}</table>'
    return table, max(0, len(rejected) - limit)


def _cards_within(selection: Selection, thumbnails: Mapping[str, bytes], budget: int) -> tuple[list[str], int]:
    """The cards that fit in `budget` bytes, in order, and how many did not."""
    cards: list[str] = []
    used = 0
    for doc in selection.shown:
        card = render_card(doc, thumbnails.get(doc.source.blob))
        size = len(card.encode("utf-8"))
        if used + size > budget:
            break
        cards.append(card)
        used += size
    return cards, len(selection.shown) - len(cards)


def _notes(selection: Selection, cut_for_size: int, rejections_left_out: int, max_bytes: int) -> str:
    """What the page leaves out and why: the sample of a large job, cards cut for size, rejection rows."""
    notes: list[str] = []
    if len(selection.shown) < selection.total:
        notes.append(
            f"This job scored {selection.total} images: shown are the first {selection.first} by name and a "
            f"deterministic sample of {selection.sampled} of the other {selection.total - selection.first} "
            "(the figures above count every image)."
        )
    if cut_for_size:
        notes.append(f"{cut_for_size} more cards were left out to keep this file under {max_bytes / 1e6:g} MB.")
    if rejections_left_out:
        notes.append(f"The table lists the first {MAX_REJECTIONS} rejected images by name; "
                     f"{rejections_left_out} more are counted by code above it.")
    return "".join(f'<p class="note">{esc(note)}</p>' for note in notes)


def _subtitle(status: JobStatus, spec: JobSpec | None, docs: Sequence[ResultDoc]) -> str:
    """Source → results location, service, state and model(s), in one line."""
    parts = [f"state {status.state}"]
    if spec is not None:
        parts.insert(0, f"{spec.container}/{spec.prefix} → {spec.results_container}/{spec.results_prefix}")
        parts.insert(1, f"service {spec.service}")
    models = sorted({doc.service.model for doc in docs})
    if models:
        parts.append(f"model {', '.join(models)}")
    return " · ".join(parts)


def render_report(
    status: JobStatus, docs: Sequence[ResultDoc], thumbnails: Mapping[str, bytes], spec: JobSpec | None = None,
    selection: Selection | None = None, max_bytes: int = MAX_REPORT_BYTES,
) -> str:
    """The whole page; its UTF-8 size stays under `max_bytes` (cards are dropped from the end to keep it so)."""
    selection = selection or select_images(docs)
    summary = summarize(docs)
    rejections, rejections_left_out = render_rejections(docs)
    codes = render_frequent(summary.codes, "Rejections by code") if summary.codes else ""
    head = (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f'<meta http-equiv="Content-Security-Policy" content="{esc(CSP)}">'
        '<meta name="referrer" content="no-referrer">'
        '<meta name="viewport" content="width=device-width,initial-scale=1">'
        f"<title>blobscore report {esc(status.job_id)}</title><style>{STYLE}</style></head><body>\n"
        f"<h1>blobscore report — job {esc(status.job_id)}</h1>"
        f'<p class="sub">{esc(_subtitle(status, spec, docs))}</p>\n'
        f"{render_stats(status, summary)}\n"
        f'<div class="panels">{render_histogram(summary.histogram)}'
        f"{render_frequent(summary.frequent, 'Most frequent top-1 labels')}{codes}</div>\n"
    )
    images_heading = f"<h2>Images ({selection.total} scored)</h2>\n"
    tail = f"</div>\n<h2>Rejected ({status.rejected})</h2>\n{rejections}\n</body></html>\n"
    fixed = len((head + images_heading + '<div class="grid">' + tail).encode("utf-8")) + NOTES_RESERVE_BYTES
    cards, cut = _cards_within(selection, thumbnails, max(0, max_bytes - fixed))
    notes = _notes(selection, cut, rejections_left_out, max_bytes)
    return f'{head}{images_heading}{notes}<div class="grid">\n{"".join(cards)}{tail}'
