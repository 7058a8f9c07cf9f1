"""A settlement's lines: what each part of the bill is, how much of it, at what price.

Energy is grouped by its kind, label and unit price (one line per price band within a
settlement, not one per reading); fixed charges are added once per ended month. Every
amount is exact (``Decimal``): the lines add up to ``net_amount``, VAT is computed on it,
and only the total is rounded (half up) to the ledger's integer minor units.
"""

from __future__ import annotations

import calendar
from dataclasses import dataclass
from datetime import date
from decimal import ROUND_HALF_UP, Decimal
from typing import Any

from billing.config import Tariff
from billing.tariffs import averaged

MWH_PER_KWH = Decimal(1_000_000)


@dataclass(frozen=True)
class Line:
    kind: str  # energy | grid | export | fixed | demand
    label: str
    quantity: Decimal
    unit: str  # kWh | day | month | kW
    unit_price: Decimal  # per unit, excluding VAT; may be negative
    amount: Decimal  # excluding VAT; export lines negative

    def as_dict(self) -> dict[str, str]:
        quantity = f"{self.quantity:.6f}" if self.unit in ("kWh", "kW") else dec(self.quantity)
        return {"kind": self.kind, "label": self.label, "quantity": quantity,
                "unit": self.unit, "unit_price": dec(self.unit_price),
                "amount": dec(self.amount)}


def dec(d: Decimal) -> str:
    """An exact decimal as plain text, at least two decimals (no exponent, nothing lost)."""
    d = d.normalize() if d else Decimal(0)
    if d.as_tuple().exponent > -2:  # type: ignore[operator]
        d = d.quantize(Decimal("0.01"))
    return format(d, "f")


def energy_lines(segs: list[tuple]) -> list[Line]:
    """Unbilled rows (start, end, mWh, amount, period, kind, label, price) grouped into lines
    (energy, grid and export), in the order their groups first appear. A spot line's price
    changes every slot: it is one line at its average price (the amount stays exact)."""
    groups: dict[tuple[str, str, Decimal | None], list[int | Decimal]] = {}
    for s in segs:
        key = (s[5], s[6], None if averaged(s[6]) else Decimal(s[7]))
        g = groups.setdefault(key, [0, Decimal(0)])
        g[0] += s[2]
        g[1] += Decimal(s[3])
    lines = []
    for (kind, label, price), (mwh, amount) in groups.items():
        kwh = Decimal(mwh) / MWH_PER_KWH
        if price is None:
            price = (Decimal(amount) / kwh).quantize(Decimal("0.000001")) if kwh else Decimal(0)
            if kind == "export":  # a credit's amount is negative, its unit price positive
                price = -price
        lines.append(Line(kind, label, kwh, "kWh", price, Decimal(amount)))
    return lines


def demand_lines(tariff: Tariff, period: str, peak_mwh: int) -> list[Line]:
    """An ended month's capacity charge: its highest quarter hour's average power (mWh in a
    quarter × 4 = mW), at least the minimum, at the version valid on the month's first."""
    year, month = (int(x) for x in period.split("-"))
    demand = tariff.on(date(year, month, 1)).demand
    if demand is None:
        return []
    peak_kw = Decimal(peak_mwh) * 4 / MWH_PER_KWH
    kw = max(peak_kw, demand.minimum_kw)
    label = ("Capacity charge (month's peak 15-minute power)" if kw == peak_kw else
             f"Capacity charge (minimum {demand.minimum_kw} kW)")
    return [Line("demand", label, kw, "kW", demand.price_per_kw, kw * demand.price_per_kw)]


def apply_export_credit(lines: list[Line], carried_in: Decimal, *, offsets_fixed: bool
                        ) -> tuple[list[Line], Decimal]:
    """Export credit against the settlement's charges: ``(lines, credit carried out)``.

    Unless the tariff's ``offsets_fixed`` says so, the credit (this settlement's export lines
    and what an earlier one carried in) offsets only energy charges: whatever exceeds them
    is carried forward to the meter's next settlement as a line of its own, so grid, fixed
    and demand charges are always paid in full. The lines still add up to the net."""
    credit = -sum((ln.amount for ln in lines if ln.kind == "export"), Decimal(0))
    if not credit and not carried_in:
        return lines, Decimal(0)
    out = list(lines)
    if carried_in:
        out.append(Line("export", "Export credit brought forward", Decimal(1), "carry",
                        -carried_in, -carried_in))
    available = credit + carried_in
    if offsets_fixed or available <= 0:
        return out, Decimal(0)
    energy = sum((ln.amount for ln in lines if ln.kind == "energy"), Decimal(0))
    excess = available - min(available, max(energy, Decimal(0)))
    if excess:
        out.append(Line("export", "Export credit carried forward", Decimal(1), "carry",
                        excess, excess))
    return out, excess


def fixed_lines(tariff: Tariff, period: str) -> list[Line]:
    """A month's fixed charges: the monthly one of the version valid on the month's first
    day, and the daily one of each day's version (prorated where a version starts inside
    the month)."""
    year, month = (int(x) for x in period.split("-"))
    lines = []
    monthly = tariff.on(date(year, month, 1)).standing_charge_per_month
    if monthly:
        lines.append(Line("fixed", "Standing charge", Decimal(1), "month", monthly, monthly))
    days: dict[Decimal, int] = {}
    for d in range(1, calendar.monthrange(year, month)[1] + 1):
        per_day = tariff.on(date(year, month, d)).fixed_per_day
        if per_day:
            days[per_day] = days.get(per_day, 0) + 1
    for per_day, n in days.items():
        lines.append(Line("fixed", "Fixed charge", Decimal(n), "day", per_day, per_day * n))
    return lines


def totals(lines: list[Line], vat_rate: Decimal, minor_units: int) -> tuple[Decimal, Decimal,
                                                                             int]:
    """(net, VAT, total in minor units): net is the lines' exact sum, VAT is net × rate, the
    total rounded half up (away from zero for a credit)."""
    net = sum((ln.amount for ln in lines), Decimal(0))
    vat = net * vat_rate
    minor = int(((net + vat) * minor_units).quantize(Decimal(1), rounding=ROUND_HALF_UP))
    return net, vat, minor


def line_dicts(lines: list[Line]) -> list[dict[str, Any]]:
    return [ln.as_dict() for ln in lines]
