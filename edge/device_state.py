"""The state of the machine this runs on, as a `client_sdk.DeviceState`.

psutil (the `edge` extra) reads the battery: `psutil.sensors_battery()` is
None on a machine without one (a desktop, a server, most containers), which
is reported as battery_level None and charging True (mains powered). "Idle"
is approximated by CPU load, the one signal every platform offers (screen
state and user input are not visible to a library): the host is idle when
its CPU was below `idle_cpu_percent` over a short sample. Whether the network
bills by the byte cannot be read portably either, so the caller says
(`unmetered`, default True: a host on a wired or Wi-Fi network).
"""

from __future__ import annotations

from typing import Any

from client_sdk import DeviceState


def _psutil() -> Any:
    try:
        import psutil
    except ImportError as error:  # an optional dependency: say how to get it
        raise RuntimeError("reading the host's device state needs psutil: pip install 'tributary[edge]'") from error
    return psutil


def read_host_state(*, unmetered: bool = True, idle_cpu_percent: float = 50.0, sample_s: float = 0.1, profile: str = "host") -> DeviceState:
    """This machine's battery, charging and idleness now (see the module docstring)."""
    if not 0 < idle_cpu_percent <= 100:
        raise ValueError(f"idle_cpu_percent must be in (0, 100], got {idle_cpu_percent!r}")
    if not sample_s > 0:
        raise ValueError(f"sample_s must be > 0 seconds, got {sample_s!r}")
    psutil = _psutil()
    battery = psutil.sensors_battery()
    if battery is None:
        level, charging = None, True
    else:
        level = min(1.0, max(0.0, float(battery.percent) / 100.0))
        # power_plugged is None where the platform cannot tell: count that as on battery
        charging = bool(battery.power_plugged)
    busy = float(psutil.cpu_percent(interval=sample_s))
    return DeviceState(battery_level=level, charging=charging, idle=busy < idle_cpu_percent, unmetered=unmetered, profile=profile)
