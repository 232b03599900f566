"""The runner: a bench file's instruments opened through the driver registry, one engine per channel, and the
run's lifetime."""
