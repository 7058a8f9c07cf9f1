"""The city's device inventory (CITYGRID_FLEET): a GeoJSON FeatureCollection of Points.

One feature per device; its properties say what it is:

- every device: ``device_id``, ``kind`` (streetlight | meter), ``district``;
- streetlights: ``rated_w`` (electrical power at 100 %), optional ``street``;
- meters: ``account_id``, ``tariff``, optional ``profile`` (household | business) and
  ``max_power_w`` (what the connection can draw; faster register increases are implausible).

Read by the simulator, the rule engine (neighbours within R metres) and the registry.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from citygrid.contract import ID_PATTERN, KINDS

EARTH_RADIUS_M = 6_371_000


class FleetError(ValueError):
    """A fleet file that cannot be used; says which feature and why."""


class _Properties(BaseModel):
    model_config = ConfigDict(extra="forbid")
    device_id: Annotated[str, Field(pattern=f"^{ID_PATTERN}$")]
    kind: str
    district: Annotated[str, Field(pattern=f"^{ID_PATTERN}$")]
    rated_w: Annotated[float, Field(gt=0, le=2000)] | None = None
    street: str | None = None
    account_id: Annotated[str, Field(min_length=1, max_length=64)] | None = None
    tariff: Annotated[str, Field(min_length=1, max_length=64)] | None = None
    profile: Literal["household", "business"] | None = None
    max_power_w: Annotated[float, Field(gt=0)] | None = None

    @model_validator(mode="after")
    def _by_kind(self) -> _Properties:
        if self.kind not in KINDS:
            raise ValueError(f"kind {self.kind!r} is not one of {sorted(KINDS)}")
        if self.kind == "streetlight" and self.rated_w is None:
            raise ValueError("a streetlight needs rated_w")
        if self.kind == "meter" and not (self.account_id and self.tariff):
            raise ValueError("a meter needs account_id and tariff")
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

    def feature(self) -> dict[str, Any]:
        props = {k: v for k, v in asdict(self).items() if v is not None and k not in ("lat", "lon")}
        return {"type": "Feature",
                "geometry": {"type": "Point", "coordinates": [round(self.lon, 7),
                                                               round(self.lat, 7)]},
                "properties": props}


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
