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
    """Unbilled rows (start, end, mWh, amount, period, kind, label, price) grouped into lines,
    in the order their groups first appear."""
    groups: dict[tuple[str, str, Decimal], list[int | Decimal]] = {}
    for s in segs:
        key = (s[5], s[6], Decimal(s[7]))
        g = groups.setdefault(key, [0, Decimal(0)])
        g[0] += s[2]
        g[1] += Decimal(s[3])
    return [Line(kind, label, Decimal(mwh) / MWH_PER_KWH, "kWh", price, Decimal(amount))
            for (kind, label, price), (mwh, amount) in groups.items()]


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
