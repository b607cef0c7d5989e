"""One-line, actionable errors for bad options."""

import numbers

import jax
import numpy as np


def check_choice(name: str, value, allowed):
  """Raises ValueError naming the option, its value and what is allowed."""
  if value not in allowed:
    raise ValueError(f'{name}={value!r}; allowed: {", ".join(map(repr, allowed))}')


def positive_int(name: str, value) -> int:
  """`value` as a Python int (a static jit argument); ValueError unless it is an integer
  >= 1 (NumPy integers count; bools do not)."""
  if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < 1:
    raise ValueError(f'{name}={value!r}; it must be a positive integer')
  return int(value)


def concrete(x):
  """Returns `x` as a NumPy array, or None when it is traced (under jit/grad)."""
  try:
    return np.asarray(x)
  except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
    return None


def check_beta(beta, name: str = 'beta'):
  """Raises ValueError when a concrete β is negative (traced values are trusted)."""
  value = concrete(beta)
  if value is not None and np.any(~(value >= 0)):  # negative or NaN.
    raise ValueError(f'{name}={beta!r} is negative or NaN; β must be >= 0 (0 = uniform '
                     'average, large = hard argmax attention)')
