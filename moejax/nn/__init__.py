"""Leaf modules shared by model/ and moe/ (they import nothing from moejax)."""
