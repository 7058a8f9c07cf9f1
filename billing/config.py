"""Billing configuration: currency, tariffs, accounts, meters (YAML, strict, located errors)."""

from __future__ import annotations

import re
from datetime import date
from decimal import Decimal
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from billing.prices import PriceFileError
from billing.prices import load as load_prices
from citygrid.fleet import Fleet
from citygrid.yamlconf import ConfigError, ConfigProblem, parse, validate

EXAMPLE = Path(__file__).parent / "examples" / "copenhagen.yaml"
DAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
_HHMM = re.compile(r"^([01]\d|2[0-3]):[0-5]\d$|^24:00$")

Money = Annotated[Decimal, Field(ge=0, max_digits=12, decimal_places=4)]
SignedMoney = Annotated[Decimal, Field(max_digits=12, decimal_places=4)]  # may be negative
MONTHS = list(range(1, 13))
_STRICT = ConfigDict(extra="forbid", frozen=True)
PAYMENT_TERMS_DAYS = 14  # an invoice's, when the billing file does not say


class Window(BaseModel):
    """A time-of-use price between two local clock times on some days."""

    model_config = _STRICT
    price: Money
    start: Annotated[str, Field(alias="from")]
    end: Annotated[str, Field(alias="to")]
    days: list[Literal["mon", "tue", "wed", "thu", "fri", "sat", "sun"]] = list(DAYS)

    @field_validator("start", "end")
    @classmethod
    def _hhmm(cls, v: str) -> str:
        if not _HHMM.match(v):
            raise ValueError(f"{v!r} is not HH:MM")
        return v

    @model_validator(mode="after")
    def _order(self) -> Window:
        if minutes(self.end) <= minutes(self.start):
            raise ValueError(f"a window runs forward: {self.start} → {self.end}")
        return self


class Band(Window):
    """A time-banded grid price: between two local clock times on some days, in some months
    (1–12, all by default), e.g. a winter peak 17:00–21:00."""

    label: Annotated[str, Field(min_length=1, max_length=60)]
    months: list[Annotated[int, Field(ge=1, le=12)]] = MONTHS


class Grid(BaseModel):
    """Grid (network) charges per kWh imported: a base price and bands over it. They are
    their own lines (kind ``grid``), added to whatever the energy costs."""

    model_config = _STRICT
    price: Money = Decimal(0)
    bands: list[Band] = []


class Spot(BaseModel):
    """Energy at the hourly (or quarter-hourly) spot price of a price area, from the billing
    file's ``price_file``: the price per MWh / 1000, plus ``markup`` per kWh."""

    model_config = _STRICT
    area: Annotated[str, Field(pattern=r"^[A-Z0-9]{2,8}$")]
    markup: SignedMoney = Decimal(0)


class Demand(BaseModel):
    """A capacity (demand) charge: the month's highest 15-minute average power, at least
    ``minimum_kw``, × ``price_per_kw``, once per ended month (like the Flemish capacity
    tariff)."""

    model_config = _STRICT
    price_per_kw: Money
    minimum_kw: Annotated[Decimal, Field(ge=0, max_digits=8, decimal_places=3)] = Decimal(0)


class Export(BaseModel):
    """How the export register is credited. ``net``: import and export are netted within
    each interval between two readings; a surplus is credited at that moment's energy price.
    ``separate``: import is billed in full, export credited at ``price`` per kWh or at the
    spot price (``spot: true``) less ``fee``. The credit offsets only energy charges (what is
    left is carried to the next settlement) unless ``offsets_fixed`` says it may offset grid,
    fixed and demand charges too."""

    model_config = _STRICT
    mode: Literal["net", "separate"]
    price: SignedMoney | None = None
    spot: bool = False
    area: Annotated[str, Field(pattern=r"^[A-Z0-9]{2,8}$")] | None = None  # else the energy's
    fee: Money = Decimal(0)
    offsets_fixed: bool = False

    @model_validator(mode="after")
    def _priced(self) -> Export:
        if self.mode == "separate" and (self.price is None) == (not self.spot):
            raise ValueError("a separate export is credited at a price or at spot: give one "
                             "of price and spot: true")
        if self.mode == "net" and (self.price is not None or self.spot or self.fee
                                   or self.area):
            raise ValueError("net metering credits a surplus at the energy price: no price, "
                             "spot, area or fee")
        return self


class Tier(BaseModel):
    model_config = _STRICT
    price: Money
    upto_kwh: Annotated[Decimal, Field(gt=0)] | None = None  # None: the last, open band


Rate = Annotated[Decimal, Field(ge=0, le=1, max_digits=6, decimal_places=4)]


class Prices(BaseModel):
    """What a tariff charges while one version is valid: one price (flat), a base price with
    time-of-use windows, or tiers per month; and fixed charges per month and per day."""

    model_config = _STRICT
    price: Money | None = None
    windows: list[Window] = []
    tiers: list[Tier] = []
    spot: Spot | None = None
    grid: Grid | None = None
    demand: Demand | None = None
    export: Export | None = None
    standing_charge_per_month: Money = Decimal(0)
    fixed_per_day: Money = Decimal(0)

    @model_validator(mode="after")
    def _shape(self) -> Prices:
        if self.tiers and (self.price is not None or self.windows):
            raise ValueError("a tariff is tiered or priced (with optional windows), not both")
        if self.spot is not None and (self.tiers or self.price is not None or self.windows):
            raise ValueError("a spot tariff has no price, windows or tiers of its own")
        if not self.tiers and self.price is None and self.spot is None:
            raise ValueError("a tariff needs a price (or tiers, or spot)")
        if (self.export is not None and self.export.spot and self.export.area is None
                and self.spot is None):
            raise ValueError("an export at spot needs its price area: export.area, or the "
                             "tariff's own spot")
        if self.tiers:
            if self.tiers[-1].upto_kwh is not None:
                raise ValueError("the last tier has no upto_kwh (it is open-ended)")
            bounds = [t.upto_kwh for t in self.tiers[:-1]]
            if None in bounds or bounds != sorted(bounds):
                raise ValueError("tiers need rising upto_kwh, all but the last")
        return self


class Version(Prices):
    """A later version of a tariff: valid from local midnight of ``valid_from`` until the
    next version starts. A price change never reprices consumption before it."""

    valid_from: date


class Tariff(Prices):
    """A tariff: its first version's prices (valid since ever), later ``versions`` each from
    its date, and a VAT rate (shown separately on every settlement, 0 if none)."""

    vat_rate: Rate = Decimal(0)
    versions: list[Version] = []

    @model_validator(mode="after")
    def _versions_do_not_overlap(self) -> Tariff:
        starts = [v.valid_from for v in self.versions]
        for a, b in zip(starts, starts[1:], strict=False):
            if b <= a:
                raise ValueError(f"tariff versions overlap: one from {b} follows one from {a} "
                                 "(list them by rising valid_from, one per date)")
        return self

    def uses_spot(self) -> bool:
        return any(p.spot is not None or (p.export is not None and p.export.spot)
                   for p in (self, *self.versions))

    def on(self, day: date) -> Prices:
        """The version valid on a local calendar day."""
        current: Prices = self
        for v in self.versions:
            if v.valid_from > day:
                break
            current = v
        return current


class AccountDefaults(BaseModel):
    model_config = _STRICT
    opening_balance: Money = Decimal(0)
    low_balance: Money = Decimal(0)


class PaymentAgent(BaseModel):
    """The account's payment agent (docs/payments.md): an HTTP endpoint that is asked to pay,
    and the shared secret both sides sign with, read from an environment variable (never
    written in the billing file)."""

    model_config = _STRICT
    url: Annotated[str, Field(pattern=r"^https?://[^\s]+$")]
    secret_env: Annotated[str, Field(pattern=r"^[A-Z_][A-Z0-9_]*$")]
    pays: Literal["settlements", "invoices"] = "settlements"


class TopUp(BaseModel):
    """Prepaid with automatic top-up: below ``below``, the agent is asked for ``amount``."""

    model_config = _STRICT
    below: Money
    amount: Annotated[Decimal, Field(gt=0, max_digits=12, decimal_places=4)]


class Seller(BaseModel):
    """Who issues the invoices: the utility's name, postal address and VAT number (EU VAT
    rules ask for all three on an invoice), and the days an invoice is payable in."""

    model_config = _STRICT
    name: Annotated[str, Field(min_length=1, max_length=200)]
    address: Annotated[str, Field(max_length=500)] | None = None
    vat_id: Annotated[str, Field(pattern=r"^[A-Z]{2}[A-Z0-9+*.]{2,13}$")] | None = None
    payment_terms_days: Annotated[int, Field(ge=0, le=365)] = PAYMENT_TERMS_DAYS


class Account(AccountDefaults):
    name: Annotated[str, Field(max_length=200)] | None = None
    address: Annotated[str, Field(max_length=500)] | None = None
    payment_agent: PaymentAgent | None = None
    top_up: TopUp | None = None

    @model_validator(mode="after")
    def _top_up_needs_agent(self) -> Account:
        if self.top_up is not None and self.payment_agent is None:
            raise ValueError("top_up needs a payment_agent to ask for the money")
        return self


class MeterBinding(BaseModel):
    model_config = _STRICT
    account: str
    tariff: str


class BillingConfig(BaseModel):
    model_config = _STRICT
    version: Literal[1] = 1
    currency: Annotated[str, Field(pattern=r"^[A-Z]{3}$")]
    minor_units: Annotated[int, Field(ge=1, le=1000)] = 100
    price_file: str | None = None  # spot prices (billing/prices.py), relative to this file
    seller: Seller | None = None
    tariffs: dict[str, Tariff]
    account_defaults: AccountDefaults = AccountDefaults()
    accounts: dict[str, Account] = {}
    meters: dict[str, MeterBinding] = {}

    @model_validator(mode="after")
    def _refs(self) -> BillingConfig:
        for meter, b in self.meters.items():
            if b.tariff not in self.tariffs:
                raise ValueError(f"meter {meter}: unknown tariff {b.tariff!r}")
        spot = sorted(name for name, t in self.tariffs.items() if t.uses_spot())
        if spot and self.price_file is None:
            raise ValueError(f"tariff {spot[0]} prices at spot: the file needs a price_file")
        if spot and self.currency not in ("DKK", "EUR"):
            raise ValueError(f"tariff {spot[0]} prices at spot: a price file has DKK and EUR "
                             f"prices, not {self.currency}")
        return self

    def minor(self, amount: Decimal) -> int:
        return int(amount * self.minor_units)

    def binding(self, meter_id: str, fleet: Fleet | None) -> MeterBinding | None:
        """The meter's account and tariff: the config, else the fleet file's properties."""
        if meter_id in self.meters:
            return self.meters[meter_id]
        device = fleet.by_id.get(meter_id) if fleet else None
        if device and device.account_id and device.tariff in self.tariffs:
            return MeterBinding(account=device.account_id, tariff=device.tariff)
        return None

    def account(self, account_id: str) -> AccountDefaults:
        return self.accounts.get(account_id, self.account_defaults)


def minutes(hhmm: str) -> int:
    h, m = hhmm.split(":")
    return int(h) * 60 + int(m)


def parse_text(text: str, name: str = "<billing>") -> BillingConfig:
    data, marks = parse(text, name)
    if not isinstance(data, dict):
        raise ConfigError([ConfigProblem(name, 1, 1, "a billing file is a mapping")])
    return validate(BillingConfig, data, marks, name)  # type: ignore[return-value]


def load(path: str | Path | None = None) -> BillingConfig:
    """The billing file, its ``price_file`` resolved next to it and checked: a price file
    with a gap or a duplicate refuses the whole configuration, as a bad tariff does."""
    path = Path(path or EXAMPLE)
    try:
        text = path.read_text()
    except OSError as e:
        raise ConfigError([ConfigProblem(str(path), 1, 1, f"cannot read: {e}")]) from None
    config = parse_text(text, str(path))
    if config.price_file is not None:
        resolved = path.parent / config.price_file
        config = config.model_copy(update={"price_file": str(resolved)})
        check_price_file(config)
    return config


def check_price_file(config: BillingConfig) -> None:
    if config.price_file is None:
        return
    try:
        load_prices(config.price_file, config.currency)
    except PriceFileError as e:
        raise ConfigError([ConfigProblem(e.path, 1, 1, p) for p in e.problems]) from None
