"""Operating a bench: the MQTT link, the control socket, the runs registry, the guardian, instrument and run
locks, cell latches, run logs."""
