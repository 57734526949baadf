"""Running on and emulating edge devices.

The built-in tasks (`edge.tasks`) that `tributary client` and `tributary demo`
train; energy estimates per update (`edge.energy`); the host's own device
state (`edge.device_state`, with psutil). Device profiles, compression and the
fleet emulator come later; this package builds on `client_sdk` only.
"""
