"""Running on and emulating edge devices.

`edge.tasks`: the built-in task (digits, CNN) that `tributary client` and
`tributary demo` train. `edge.profiles`: device profiles and fleets.
`edge.datasets`: federated data sets (digits with Dirichlet label skew,
FedProx's Synthetic) and small models. `edge.simulate`: the fleet emulator
behind `tributary simulate`. `edge.energy`: energy estimates per update.
`edge.device_state`: the host's own device state (psutil). This package
builds on `client_sdk` only.
"""
