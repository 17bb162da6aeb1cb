"""Release: the gate's decision, publishing a run and the retention of old runs."""
