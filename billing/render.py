"""Invoices and credit notes as HTML (jinja2, autoescaped) and PDF (fpdf2).

Both render the stored document (billing/invoices.py) and nothing else, so what a customer
downloads is what was hashed into the ledger. The PDF uses DejaVu Sans when Debian's
fonts-dejavu is installed (every character of a Danish name), else the PDF core font
Helvetica with the characters Latin-1 lacks replaced.
"""

from __future__ import annotations

import functools
import logging
from datetime import datetime
from decimal import Decimal
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

DEJAVU = Path("/usr/share/fonts/truetype/dejavu")
TITLES = {"invoice": "Invoice", "credit_note": "Credit note"}

TEMPLATE = Path(__file__).parent / "templates" / "invoice.html.j2"



@functools.cache
def _template():
    """Compiled on first use: importing billing (every service does) loads no jinja2."""
    from jinja2 import Environment, select_autoescape

    env = Environment(autoescape=select_autoescape(default=True, default_for_string=True))
    return env.from_string(TEMPLATE.read_text())


def formatter(doc: dict[str, Any]):
    """Minor units → the currency's decimal text, for this document's currency."""
    units = int(doc.get("minor_units", 100))
    n, digits = units, 0
    while n % 10 == 0 and n > 1:
        n, digits = n // 10, digits + 1
    digits = digits if n == 1 else 4

    def m(minor: int) -> str:
        return f"{Decimal(minor) / units:,.{digits}f}"

    return m


def _pct(rate: str | None) -> str:
    return f"{Decimal(rate or '0') * 100:.4g} %"


def _when(doc: dict[str, Any]):
    tz = ZoneInfo(doc.get("timezone") or "UTC")

    def when(ms: int | None) -> str:
        return "" if ms is None else datetime.fromtimestamp(ms / 1000, tz).strftime(
            "%Y-%m-%d %H:%M")

    return when


def _context(doc: dict[str, Any]) -> dict[str, Any]:
    kind = doc.get("type", "invoice")
    return {"d": doc, "title": TITLES.get(kind, "Invoice"), "m": formatter(doc), "pct": _pct,
            "when": _when(doc),
            "total_label": "Total credited" if kind == "credit_note" else "Total"}


def render_html(doc: dict[str, Any]) -> str:
    """The document as one self-contained HTML page (every value escaped)."""
    return _template().render(**_context(doc))


# ------------------------------------------------------------------ PDF


def _pdf(unicode_font: bool):
    from fpdf import FPDF

    # fontTools logs ~60 INFO lines for each font it subsets: noise in any service's log.
    logging.getLogger("fontTools").setLevel(logging.WARNING)
    pdf = FPDF(format="A4")
    regular, bold = DEJAVU / "DejaVuSans.ttf", DEJAVU / "DejaVuSans-Bold.ttf"
    if unicode_font and regular.is_file() and bold.is_file():
        pdf.add_font("DejaVu", "", str(regular))
        pdf.add_font("DejaVu", "B", str(bold))
        return pdf, "DejaVu", str
    return pdf, "Helvetica", _latin1


def _latin1(text: str) -> str:
    """What the core fonts can show: dashes and quotes as ASCII, anything else outside
    Latin-1 as '?'."""
    for a, b in (("–", "-"), ("—", "-"), ("‘", "'"), ("’", "'"), ("“", '"'), ("”", '"'),
                 ("…", "...")):
        text = text.replace(a, b)
    return text.encode("latin-1", "replace").decode("latin-1")


def render_pdf(doc: dict[str, Any], *, compress: bool = True, unicode_font: bool = True
               ) -> bytes:
    """The document as an A4 PDF. ``compress=False, unicode_font=False`` leaves its text
    readable in the file (the tests search it)."""
    pdf, font, txt = _pdf(unicode_font)
    pdf.set_compression(compress)
    c = _context(doc)
    m, pct = c["m"], c["pct"]
    pdf.set_title(txt(f"{c['title']} {doc['number']}"))
    pdf.add_page()
    width = pdf.epw

    def line(text: str, size: float = 10, style: str = "", h: float = 5, align: str = "L",
             w: float = 0) -> None:
        pdf.set_font(font, style, size)
        pdf.cell(w or width, h, txt(text), align=align, new_x="LMARGIN", new_y="NEXT")

    line(doc["seller"]["name"], 12, "B")
    if doc["seller"].get("address"):
        line(doc["seller"]["address"])
    if doc["seller"].get("vat_id"):
        line(f"VAT {doc['seller']['vat_id']}")
    pdf.ln(4)
    line(f"{c['title']} {doc['number']}", 16, "B", 8)
    line(f"Issued {doc['issued_at']}")
    if doc.get("refers_to"):
        line(f"Corrects invoice {doc['refers_to']}")
    if doc.get("period"):
        line(f"Period {doc['period']}")
    if doc.get("from"):
        line(f"Covers {doc['from']} - {doc['to']}")
    name = doc["account"].get("name")
    line(f"Account {doc['account']['id']}" + (f" - {name}" if name else ""), 11, "B", 7)
    if doc["account"].get("address"):
        line(doc["account"]["address"])
    if doc.get("reason"):
        line(f"Reason: {doc['reason']}")
    pdf.ln(2)
    cols = (8, width - 8 - 32 - 28 - 16 - 30, 32, 28, 16, 30)

    def fit(text: str, w: float) -> str:
        """Cut to the column's width (a cell does not clip what overflows it)."""
        text = txt(text)
        if pdf.get_string_width(text) <= w - 1:
            return text
        while text and pdf.get_string_width(text + "...") > w - 1:
            text = text[:-1]
        return text + "..."

    def row(cells: tuple[str, ...], style: str = "") -> None:
        pdf.set_font(font, style, 9)
        for i, (w, text) in enumerate(zip(cols, cells, strict=True)):
            pdf.cell(w, 6, fit(text, w), align="L" if i < 2 else "R")
        pdf.ln(6)

    row(("#", "Item", "Quantity", "Unit price", "VAT", f"Amount {doc['currency']}"), "B")
    for i, li in enumerate(doc["lines"], start=1):
        price = li.get("unit_price") or ""
        if price and li.get("average_price"):
            price = f"avg {price}"
        row((str(i), li["label"], f"{li['quantity']} {li['unit']}".strip(), price,
             pct(li.get("vat_rate")), m(li["amount_minor"])))
    row(("", "Net", "", "", "", m(doc["net_minor"])), "B")
    for v in doc["vat"]:
        row(("", f"VAT {pct(v['rate'])} of {m(v['base_minor'])}", "", "", "",
             m(v["amount_minor"])))
    row(("", c["total_label"], "", "", "", f"{m(doc['total_minor'])} {doc['currency']}"), "B")
    if doc.get("payments"):
        pdf.ln(3)
        line("Payments received", 11, "B", 7)
        for p in doc["payments"]:
            line(f"{c['when'](p.get('at_ms'))}  {p.get('reference') or ''}  "
                 f"{m(p['amount_minor'])}", 9)
        line(f"Received {m(doc['payments_minor'])} {doc['currency']}", 9, "B")
    pdf.ln(3)
    line(f"Account balance {m(doc['balance_minor'])} {doc['currency']}. Outstanding: "
         f"{m(doc['outstanding_minor'])} {doc['currency']}"
         + (f", due {doc['due_date']}" if doc.get("due_date") else ""), 10, "B")
    pdf.ln(4)
    pdf.set_font(font, "", 6)
    small = ["Ledger entries:"] + [f"#{e['seq']} {e.get('meter') or ''} {e.get('period') or ''} "
                                   f"{e['hash']}" for e in doc.get("entries", [])]
    if doc.get("refers_to_sha256"):
        small.append(f"invoice {doc['refers_to']} document {doc['refers_to_sha256']}")
    small.append(f"head at issue: #{doc['ledger_head']['seq']} {doc['ledger_head']['hash']}")
    small.append(f"this document is ledger entry #{doc['ledger_entry_seq']}")
    for s in small:
        pdf.multi_cell(width, 3, txt(s), new_x="LMARGIN", new_y="NEXT")
    return bytes(pdf.output())


__all__ = ["formatter", "render_html", "render_pdf"]
