//! Helpers for the integration tests: locating binaries, temp dirs, child-process guards.
