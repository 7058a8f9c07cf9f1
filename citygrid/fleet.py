"""The city's device inventory (CITYGRID_FLEET): a GeoJSON FeatureCollection of Points.

One feature per device; its properties say what it is:

- every device: ``device_id``, ``kind`` (streetlight | meter), ``district``;
- streetlights: ``rated_w`` (electrical power at 100 %), optional ``street``, ``road`` (the
  road class: arterial | residential | footpath | park), ``cabinet`` (the control cabinet
  that feeds it) and ``lamp_type`` (a name from the lamp types, citygrid/lamps.py);
- meters: ``account_id``, ``tariff``, optional ``profile`` (household | business) and
  ``max_power_w`` (what the connection can draw; faster register increases are implausible);
- an off-the-shelf device: ``device_profile`` (how it talks, ``adapters/profiles``) and
  ``native_id`` (its own name on its own topics); without them a device speaks the contract.

Read by the simulator, the rule engine (neighbours within R metres) and the registry.
"""

from __future__ import annotations

import json
import math
from collections.abc import Collection, Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from citygrid.contract import ID_PATTERN, KINDS

EARTH_RADIUS_M = 6_371_000
PROFILE_PATTERN = r"^[a-z0-9][a-z0-9-]{0,63}$"
# A native id may be a topic level (no MQTT wildcards or separators) or a payload value.
NATIVE_ID_PATTERN = r"^[^/+#\x00-\x1f]{1,128}$"
ROADS = ("arterial", "residential", "footpath", "park")


class FleetError(ValueError):
    """A fleet file that cannot be used; says which feature and why."""


class _Properties(BaseModel):
    model_config = ConfigDict(extra="forbid")
    device_id: Annotated[str, Field(pattern=f"^{ID_PATTERN}$")]
    kind: str
    district: Annotated[str, Field(pattern=f"^{ID_PATTERN}$")]
    rated_w: Annotated[float, Field(gt=0, le=2000, allow_inf_nan=False)] | None = None
    street: str | None = None
    account_id: Annotated[str, Field(min_length=1, max_length=64)] | None = None
    tariff: Annotated[str, Field(min_length=1, max_length=64)] | None = None
    profile: Literal["household", "business"] | None = None
    max_power_w: Annotated[float, Field(gt=0, allow_inf_nan=False)] | None = None
    device_profile: Annotated[str, Field(pattern=PROFILE_PATTERN)] | None = None
    native_id: Annotated[str, Field(pattern=NATIVE_ID_PATTERN)] | None = None
    road: Literal["arterial", "residential", "footpath", "park"] | None = None
    cabinet: Annotated[str, Field(pattern=f"^{ID_PATTERN}$")] | None = None
    lamp_type: Annotated[str, Field(pattern=PROFILE_PATTERN)] | None = None

    @model_validator(mode="after")
    def _by_kind(self) -> _Properties:
        if self.kind not in KINDS:
            raise ValueError(f"kind {self.kind!r} is not one of {sorted(KINDS)}")
        if self.kind == "streetlight" and self.rated_w is None:
            raise ValueError("a streetlight needs rated_w")
        if self.kind == "meter" and not (self.account_id and self.tariff):
            raise ValueError("a meter needs account_id and tariff")
        if self.kind != "streetlight" and (self.road or self.cabinet or self.lamp_type):
            raise ValueError("road, cabinet and lamp_type are a streetlight's")
        if (self.device_profile is None) != (self.native_id is None):
            raise ValueError("device_profile and native_id go together: a device with a "
                             "profile needs its native id, and a native id needs a profile")
        return self


@dataclass(frozen=True, slots=True)
class FleetDevice:
    device_id: str
    kind: str
    district: str
    lat: float
    lon: float
    rated_w: float | None = None
    street: str | None = None
    account_id: str | None = None
    tariff: str | None = None
    profile: str | None = None
    max_power_w: float | None = None
    device_profile: str | None = None
    native_id: str | None = None
    road: str | None = None
    cabinet: str | None = None
    lamp_type: str | None = None

    def feature(self) -> dict[str, Any]:
        props = {k: v for k, v in asdict(self).items() if v is not None and k not in ("lat", "lon")}
        return {"type": "Feature",
                "geometry": {"type": "Point", "coordinates": [round(self.lon, 7),
                                                               round(self.lat, 7)]},
                "properties": props}


def check_device(device: FleetDevice, *, tariffs: Collection[str] | None = None,
                 profiles: Collection[str] | None = None,
                 lamp_types: Collection[str] | None = None) -> list[str]:
    """What is wrong with one inventory entry, as ``field: problem`` lines (empty: nothing).

    The one check every way into the registry uses (``citygrid devices add|import|edit``,
    the API, ``CITYGRID_FLEET``): ids that fit the contract, coordinates finite and on the
    globe, rated power positive, a meter's tariff known to the billing configuration
    (``tariffs``), a device profile known to the adapters (``profiles``) and a streetlight's
    lamp type known to the lamp types (``lamp_types``, citygrid/lamps.py) when given.
    """
    problems = []
    for name, value, low, high in (("lat", device.lat, -90, 90), ("lon", device.lon, -180, 180)):
        if not isinstance(value, int | float) or isinstance(value, bool):
            problems.append(f"{name}: must be a number, not {value!r}")
        elif not math.isfinite(value):
            problems.append(f"{name}: must be a finite number, not {value}")
        elif not low <= value <= high:
            problems.append(f"{name}: {value} is outside {low}…{high}")
    props = {k: v for k, v in asdict(device).items() if k not in ("lat", "lon")}
    try:
        _Properties.model_validate({k: v for k, v in props.items() if v is not None})
    except ValidationError as e:
        for x in e.errors(include_url=False):
            where = ".".join(map(str, x["loc"]))
            problems.append(f"{where}: {x['msg']}" if where else x["msg"].removeprefix(
                "Value error, "))
    if tariffs is not None and device.kind == "meter" and device.tariff and \
            device.tariff not in tariffs:
        problems.append(f"tariff: {device.tariff!r} is not in the billing configuration "
                        f"(known: {', '.join(sorted(tariffs)) or 'none'})")
    if profiles is not None and device.device_profile and device.device_profile not in profiles:
        problems.append(f"device_profile: no profile {device.device_profile!r} "
                        f"(known: {', '.join(sorted(profiles)) or 'none'})")
    if lamp_types is not None and device.lamp_type and device.lamp_type not in lamp_types:
        problems.append(f"lamp_type: no lamp type {device.lamp_type!r} "
                        f"(known: {', '.join(sorted(lamp_types)) or 'none'})")
    return problems


def distance_m(a: FleetDevice, b: FleetDevice) -> float:
    """Great-circle distance (haversine), metres."""
    p1, p2 = math.radians(a.lat), math.radians(b.lat)
    dp, dl = p2 - p1, math.radians(b.lon - a.lon)
    h = math.sin(dp / 2) ** 2 + math.cos(p1) * math.cos(p2) * math.sin(dl / 2) ** 2
    return 2 * EARTH_RADIUS_M * math.asin(math.sqrt(h))


GRID_M = 100.0  # cell size of the neighbour index


class Fleet:
    def __init__(self, devices: Iterable[FleetDevice]):
        self.devices = list(devices)
        self.by_id = {d.device_id: d for d in self.devices}
        self._grid: dict[tuple[int, int], list[FleetDevice]] | None = None
        if len(self.by_id) != len(self.devices):
            seen: set[str] = set()
            dupes = sorted({d.device_id for d in self.devices
                            if d.device_id in seen or seen.add(d.device_id)})
            raise FleetError(f"device ids used twice: {', '.join(dupes[:10])}")

    def __len__(self) -> int:
        return len(self.devices)

    def __iter__(self) -> Iterator[FleetDevice]:
        return iter(self.devices)

    def of_kind(self, kind: str) -> list[FleetDevice]:
        return [d for d in self.devices if d.kind == kind]

    def _cell(self, d: FleetDevice) -> tuple[int, int]:
        return (int(math.floor(d.lat * 111_320 / GRID_M)),
                int(math.floor(d.lon * 111_320 * self._coslat / GRID_M)))

    def neighbours(self, device_id: str, radius_m: float) -> list[FleetDevice]:
        """Other devices of the same kind within ``radius_m``, nearest first.

        A grid of 100 m cells keeps this to the few devices nearby (10,000 lights: µs, not ms).
        """
        if self._grid is None:
            lat0 = sum(d.lat for d in self.devices) / max(1, len(self.devices))
            self._coslat = math.cos(math.radians(lat0))
            self._grid = {}
            for d in self.devices:
                self._grid.setdefault(self._cell(d), []).append(d)
        me = self.by_id[device_id]
        cy, cx = self._cell(me)
        rings = int(math.ceil(radius_m / GRID_M)) + 1  # +1: cos(lat) varies across the city
        near = [(distance_m(me, d), d)
                for y in range(cy - rings, cy + rings + 1)
                for x in range(cx - rings, cx + rings + 1)
                for d in self._grid.get((y, x), ())
                if d.kind == me.kind and d.device_id != device_id]
        return [d for dist, d in sorted(near, key=lambda x: x[0]) if dist <= radius_m]

    def geojson(self) -> dict[str, Any]:
        return {"type": "FeatureCollection", "features": [d.feature() for d in self.devices]}

    def dump(self, path: str | Path | None = None) -> str:
        text = json.dumps(self.geojson(), indent=None, separators=(",", ":"))
        text = text.replace('{"type":"Feature"', '\n{"type":"Feature"')  # one device a line
        if path:
            Path(path).write_text(text + "\n")
        return text

    @classmethod
    def parse(cls, document: Any, source: str = "fleet") -> Fleet:
        if not isinstance(document, dict) or document.get("type") != "FeatureCollection":
            raise FleetError(f"{source}: not a GeoJSON FeatureCollection")
        features = document.get("features")
        if not isinstance(features, list):
            raise FleetError(f"{source}: 'features' must be a list")
        devices, errors = [], []
        for i, feature in enumerate(features):
            where = f"{source}: features[{i}]"
            try:
                geometry = feature["geometry"]
                if geometry["type"] != "Point":
                    raise ValueError(f"geometry must be a Point, not {geometry['type']}")
                lon, lat = (float(c) for c in geometry["coordinates"][:2])
                if not (-90 <= lat <= 90 and -180 <= lon <= 180):
                    raise ValueError(f"coordinates [{lon}, {lat}] are not lon/lat")
                props = _Properties.model_validate(feature.get("properties") or {})
            except ValidationError as e:
                errors += [f"{where}.properties.{'.'.join(map(str, x['loc']))}: {x['msg']}"
                           .replace("properties.: ", "properties: ")
                           for x in e.errors(include_url=False)]
                continue
            except (KeyError, TypeError, ValueError) as e:
                errors.append(f"{where}: {e}")
                continue
            devices.append(FleetDevice(lat=lat, lon=lon, **props.model_dump()))
        if errors:
            more = f"\n… and {len(errors) - 20} more" if len(errors) > 20 else ""
            raise FleetError("\n".join(errors[:20]) + more)
        return cls(devices)

    @classmethod
    def load(cls, path: str | Path) -> Fleet:
        try:
            document = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise FleetError(f"{path}: {e}") from None
        return cls.parse(document, str(path))
