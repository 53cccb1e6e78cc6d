"""Outputs: atomic saving, A1111 infotext, grids."""
