"""Release: the registry of published/, the gate's decision, publishing a run and the retention of old runs."""
