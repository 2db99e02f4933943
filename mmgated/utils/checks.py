"""Validation of the numbers users put in configs."""
import math
from numbers import Real
from typing import Callable


def check_number(name: str,
                 value,
                 allowed: str = 'a finite number',
                 condition: Callable[[float], bool] = lambda v: True
                 ) -> float:
    """Return ``value`` as a float if it is a finite real number meeting
    ``condition``; raise otherwise.

    Booleans are rejected although Python counts them as numbers: ``True``
    in a config is a typo, not 1.0. NaN and infinity are rejected because
    they would train silently to NaN weights.

    Args:
        name (str): The setting, as the error names it.
        value: The value to check.
        allowed (str): What is allowed, for the error message.
        condition (Callable): A further condition on the float value.

    Returns:
        float: ``float(value)``.

    Raises:
        ValueError: Naming the setting, the bad value and what is allowed.
    """
    if (isinstance(value, bool) or not isinstance(value, Real)
            or not math.isfinite(value) or not condition(float(value))):
        raise ValueError(f'{name}={value!r} is invalid; allowed: {allowed}')
    return float(value)


def check_weight(name: str, value) -> float:
    """:func:`check_number` for a loss weight or schedule point: finite and
    >= 0."""
    return check_number(name, value, 'a finite number >= 0',
                        lambda v: v >= 0)
