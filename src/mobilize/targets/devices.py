"""Device profiles: plain data for the fit check (`mobilize fit`). Memory bandwidth is the theoretical
peak of the memory interface (bus width x transfer rate); decode on a phone is bound by it."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Device:
    name: str
    soc: str
    cores: str
    ram_gb: float
    memory: str
    bandwidth_gb_s: float  # peak
    app_fraction: float = 0.5  # of RAM one foreground app can count on before the OS reclaims it


DEVICES: dict[str, Device] = {
    d.name: d
    for d in [
        Device("pixel6", "Google Tensor G1", "2x Cortex-X1 + 2x A76 + 4x A55", 8, "LPDDR5, 64-bit, 6400 MT/s", 51.2),
        Device("pixel8", "Google Tensor G3", "1x Cortex-X3 + 4x A715 + 4x A510", 8, "LPDDR5X, 64-bit, 8533 MT/s", 68.3),
        Device("iphone15", "Apple A16", "2 performance + 4 efficiency", 6, "LPDDR5, 64-bit, 6400 MT/s", 51.2),
    ]
}
