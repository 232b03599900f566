"""Results: per-cycle analysis, Battery Data Format export, the report."""
