"""The run around the method: its flags and their errors (flags.py), files written whole or not at all (atomic.py),
checkpoints and exact resume (checkpoint.py), the report's table, grid and curves (report.py, images.py)."""
