"""Statistics of order sensitivity: pure functions used by the report stage and the scheduled sweeps."""
