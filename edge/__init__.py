"""Running on and emulating edge devices.

For now: the built-in tasks (`edge.tasks`) that `tributary client` and
`tributary demo` train. Device profiles, eligibility, compression and the
fleet emulator come later; this package builds on `client_sdk` only.
"""
