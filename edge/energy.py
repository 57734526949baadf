"""Energy per update: what one round of local training and its transfers cost a device.

The model (an estimate, never a measurement):

    E = P_train * t_train + sum over transfers of (e_byte * bytes + e_transfer)

- P_train: the device's average power draw while training, in watts (from its
  profile: e.g. a phone SoC under sustained load draws a few watts, a laptop
  CPU 15-45 W, a GPU its board power); t_train: the measured wall-clock time
  of the local round (`Client.fit` measures it). Energy = power x time is the
  definition; what the model leaves out is idle draw, screen, and how power
  varies within the round.
- the radio: an energy cost per byte moved plus a fixed cost per transfer
  (ramp-up and "tail" time spent in high-power radio states after it). The
  defaults below are the per-kilobyte slopes and fixed terms of the energy
  model fitted to phone measurements by Balasubramanian, Balasubramanian and
  Venkataramani, "Energy Consumption in Mobile Phones: A Measurement Study and
  Implications for Network Applications" (IMC 2009): roughly 0.007 J/KB with
  about 5.9 J of scan and association per transfer on Wi-Fi, 0.025 J/KB with
  about 3.5 J of ramp and tail on 3G. They are 2009 radios, useful for
  comparing configurations (e.g. compressed against full updates, Wi-Fi
  against cellular), not as absolute figures for today's phones; pass your
  own `RadioCost` when you have better ones.

Use an `EnergyModel` as `fit(..., energy_estimate=model)`, which calls it with
the training time and the update's size, or call `estimate_update_energy`
directly (the fleet emulator does) and push with `energy_joules=`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

KILOBYTE = 1024


def _non_negative(name: str, value: float) -> None:
    if isinstance(value, bool) or not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")


@dataclass(frozen=True)
class RadioCost:
    """Energy of moving bytes over one kind of link."""

    joules_per_byte: float
    joules_per_transfer: float = 0.0
    """Fixed cost of each transfer (radio ramp-up and tail, or Wi-Fi scan and association)."""

    def __post_init__(self) -> None:
        _non_negative("joules_per_byte", self.joules_per_byte)
        _non_negative("joules_per_transfer", self.joules_per_transfer)

    def transfer(self, num_bytes: int) -> float:
        """Joules to move `num_bytes` in one transfer (0 for no transfer at all)."""
        _non_negative("num_bytes", num_bytes)
        return 0.0 if num_bytes == 0 else self.joules_per_byte * num_bytes + self.joules_per_transfer


NO_RADIO = RadioCost(0.0)
"""Transfers counted as free (a wired host, or compute energy only)."""
WIFI_2009 = RadioCost(0.007 / KILOBYTE, 5.9)
"""Balasubramanian et al. 2009, Wi-Fi (see the module docstring)."""
CELLULAR_3G_2009 = RadioCost(0.025 / KILOBYTE, 3.5)
"""Balasubramanian et al. 2009, 3G (see the module docstring)."""


def estimate_update_energy(
    train_watts: float,
    train_seconds: float,
    *,
    upload_bytes: int = 0,
    download_bytes: int = 0,
    radio: RadioCost = NO_RADIO,
) -> float:
    """Joules one update cost: training at `train_watts` for `train_seconds`,
    plus pulling `download_bytes` and pushing `upload_bytes` over `radio`."""
    _non_negative("train_watts", train_watts)
    _non_negative("train_seconds", train_seconds)
    return train_watts * train_seconds + radio.transfer(download_bytes) + radio.transfer(upload_bytes)


@dataclass(frozen=True)
class EnergyModel:
    """A device's energy model, callable as `fit`'s `energy_estimate`:
    `model(train_seconds, upload_bytes) -> joules`. `download_bytes` is
    the model size pulled before each round (0: do not count the pull)."""

    train_watts: float
    radio: RadioCost = NO_RADIO
    download_bytes: int = 0

    def __post_init__(self) -> None:
        _non_negative("train_watts", self.train_watts)
        _non_negative("download_bytes", self.download_bytes)

    def __call__(self, train_seconds: float, upload_bytes: int) -> float:
        return estimate_update_energy(
            self.train_watts, train_seconds, upload_bytes=upload_bytes, download_bytes=self.download_bytes, radio=self.radio
        )
