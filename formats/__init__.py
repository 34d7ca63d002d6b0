"""Stable Diffusion and prompt lists in the formats people publish them in: --model as a folder, a hub id or a
single file (models.py, single_file.py), the prompts a run trains on (prompts.py), and the trained student in the
formats other tools load (export.py). The method (swiftbrush.py) calls these; they never call it."""
