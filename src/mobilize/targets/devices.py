"""Device profiles: plain data for the fit check (`mobilize fit`) and for the presets' plans.

Memory: how much one foreground app can keep resident (weights it memory-maps plus what it allocates) before
Android reclaims from it. Android counts the two kinds apart: clean file-backed pages (a memory-mapped weights
file) are evicted under pressure and read again from flash when touched; anonymous memory (the KV cache,
activations, the runtime's arenas) can only be swapped to zRAM or freed by killing the app
(https://source.android.com/docs/core/perf/memory-limiter: past its limit "the kernel evicts the app's file-backed
memory and swaps out its anonymous memory"). A package fits when both together stay under the budget, so that no
weight page is re-read while decoding.

The 8 GB budget: llama.cpp's 2023 Android demo held a 7B Q4_0 model (4.53 GB context, 0.51 GB KV cache) on
"recent flagship Android devices" at ~5 tok/s (https://github.com/ggml-org/llama.cpp/issues/124), and MLC LLM's
maintainers answer that 6 GB phones cannot hold a 7B (https://github.com/mlc-ai/mlc-llm/issues/1777). We take
4.5 GB (56% of RAM) for an 8 GB phone: below what the demo held, with room for the system and the app itself. The
6 GB iPhone's 3.0 GB is an estimate (iOS ends apps past a per-device limit the app can read with
os_proc_available_memory; no public figure for the A16 models was found).

Bandwidth: the theoretical peak of the memory interface (bus width x transfer rate). Decode is bound by the
bytes a step reads; what a phone's CPU reaches is a fraction of the peak: the demo above, ~5 tok/s over ~3.8 GB
of weights on a 51.2 GB/s phone, is 0.37 of it. The range reported is 0.25 (a loaded, throttled phone) to 0.45
(the best sustained reads reported for phone CPUs, our estimate), the demo's figure between them.
"""

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
    resident_gb: float  # what one foreground app can keep resident (file-backed + anonymous), see above
    bandwidth_fraction: tuple[float, float] = (0.25, 0.45)  # of the peak a decode step's reads reach


DEVICES: dict[str, Device] = {
    d.name: d
    for d in [
        Device(
            "pixel6", "Google Tensor G1", "2x Cortex-X1 + 2x A76 + 4x A55", 8, "LPDDR5, 64-bit, 6400 MT/s", 51.2, 4.5
        ),  # fmt: skip
        Device(
            "pixel8", "Google Tensor G3", "1x Cortex-X3 + 4x A715 + 4x A510", 8, "LPDDR5X, 64-bit, 8533 MT/s", 68.3, 4.5
        ),  # fmt: skip
        Device("iphone15", "Apple A16", "2 performance + 4 efficiency", 6, "LPDDR5, 64-bit, 6400 MT/s", 51.2, 3.0),
    ]
}
