"""The faces: the CLI, the Python API, the live display, the simulated bench."""
