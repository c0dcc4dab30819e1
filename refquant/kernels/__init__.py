"""Numba-jitted hot loops (cache=True: a second process loads them compiled)."""
