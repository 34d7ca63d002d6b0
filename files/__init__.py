"""What a run reads and writes: teachers (a local folder or a hub id), prompt files, checkpoints and exports,
PNG grids and plots, and the report table. The method (swiftbrush.py) calls these; they never call it."""
