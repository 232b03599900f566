"""Testing helpers shipped with cellbench: the pytest plugin (`cellbench.testing.plugin`)."""
