"""Lamps: each streetlight's burning hours, switch-ons and remaining life, from the state the
rule engine's lamp monitor saves — which lamps to replace first."""

from typing import Annotated, Literal

from fastapi import APIRouter, Query

import rules
from gateway.deps import AUTH_ERRORS, RegistryDep, SettingsDep, Viewer
from gateway.models import LampOut

router = APIRouter(tags=["lamps"], responses=AUTH_ERRORS)
# Each sort puts first the lamps most worth a look (then by device id).
_SORTS = {"burning_h": lambda r: (-r.burning_h, r.device_id),
          "remaining_life_h": lambda r: (r.remaining_life_h, r.device_id),
          "switch_ons": lambda r: (-r.switch_ons, r.device_id),
          "device_id": lambda r: r.device_id}


@router.get("/api/v1/lamps", response_model=list[LampOut])
def lamps(_: Viewer, settings: SettingsDep, registry: RegistryDep,
          sort: Literal["burning_h", "remaining_life_h", "switch_ons", "device_id"] = "burning_h",
          limit: Annotated[int, Query(ge=1, le=10_000)] = 100,
          district: Annotated[str | None, Query(max_length=64)] = None) -> list[LampOut]:
    """The lamps, most burnt first (``sort=remaining_life_h``: least life left first;
    ``switch_ons``: most switched first), optionally of one district."""
    districts = {r["device_id"]: r["district"]
                 for r in registry.records(kind="streetlight", district=district)}
    rows = [r for r in rules.read_lamps(settings.data_dir)
            if district is None or r.device_id in districts]
    rows.sort(key=_SORTS[sort])
    return [LampOut(device_id=r.device_id, district=districts.get(r.device_id),
                    lamp_type=r.lamp_type, burning_h=round(r.burning_h, 3),
                    switch_ons=r.switch_ons, remaining_life_h=round(r.remaining_life_h, 3),
                    replaced_ms=r.replaced_ms) for r in rows[:limit]]
