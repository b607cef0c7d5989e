"""Library messages out of the console: the absl/Python logging of orbax and friends, and the
exceptions library threads cannot raise (tensorstore callbacks that find orbax's event loop
closed after a failed read print hundreds of 'Event loop is closed' tracebacks).

Without --verbose they are appended to a file (the workdir's library.log), so the console
shows tx's own lines only; the file appears with the first message. With --verbose they stay
on the console.
"""

from __future__ import annotations

import logging
import sys
import traceback

from absl import logging as absl_logging


class _LazyFile:
  """A file opened for appending at the first write."""

  def __init__(self, path: str):
    self.path, self.file = path, None

  def write(self, text: str):
    try:
      if self.file is None:
        self.file = open(self.path, 'a')
      self.file.write(text)
      self.file.flush()
    except OSError:
      pass  # a full disk, say: the run reports that itself.


def route_to(path: str):
  """Sends library logging (what absl's verbosity lets through) and unraisable exceptions to
  `path`."""
  out = _LazyFile(path)
  handler = logging.StreamHandler(out)
  handler.setFormatter(absl_logging.PythonFormatter())
  root = logging.getLogger()
  for h in list(root.handlers):
    if h is absl_logging.get_absl_handler() or isinstance(h, logging.StreamHandler):
      root.removeHandler(h)
  root.addHandler(handler)

  def unraisable(u):
    out.write(''.join(traceback.format_exception(u.exc_type, u.exc_value, u.exc_traceback)))

  sys.unraisablehook = unraisable
