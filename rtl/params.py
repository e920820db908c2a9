"""Elaboration-time parameter checks shared by every component.

A rejected parameter raises ``ValueError`` naming the parameter, the allowed range and the
value. The half-built component is marked silent first: Amaranth would otherwise warn, when
it is collected, that it was created but never elaborated.
"""

__all__ = ["check_int", "reject"]


def reject(component, message):
    component._MustUse__silence = True  # never elaborated because it was refused, not forgotten
    raise ValueError(message)


def check_int(component, name, value, lo, hi):
    """``value`` must be an int in ``lo..hi``; returns it."""
    if type(value) is not int or not lo <= value <= hi:
        reject(component, f"{name} must be an integer in {lo}..{hi}, not {value!r}")
    return value
