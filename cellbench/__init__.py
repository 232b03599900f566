"""cellbench: an async hardware-in-the-loop test-bench controller for all-solid-state battery cells."""
