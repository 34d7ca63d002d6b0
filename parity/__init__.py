"""SD from scratch proven equal to diffusers (the oracle), and the loaders' errors."""
