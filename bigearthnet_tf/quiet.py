"""TensorFlow without its start-up noise: real errors still reach the user.

Importing TensorFlow prints, through C++ logging that runs before any setting is read, lines that
mean nothing to a user: "WARNING: All log messages before absl::InitializeLog() ...", informational
lines about oneDNN and CPU instructions, "Could not find cuda drivers", and on a machine without a GPU
"failed call to cuInit". `TF_CPP_MIN_LOG_LEVEL` does not reach them. `import_tensorflow_quietly`
therefore imports TensorFlow (and initialises its devices, which prints the cuInit line) while file
descriptor 2 goes through a pipe; a thread forwards every line that is not such noise to the real
standard error as it arrives, so any other message (a warning, an error, a crash report) is shown.
Later imports of TensorFlow are free and print nothing more.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
import threading
from collections.abc import Iterator

# Lines of TensorFlow's start-up that say nothing a user can act on.
NOISE = (
    re.compile(r"^WARNING: All log messages before absl::InitializeLog\(\) is called are written to STDERR$"),
    re.compile(r"^I\d{4} \d\d:\d\d:[\d.]+ +\d+ \S+:\d+\] "),  # C++ informational lines (I0000 ...)
    re.compile(r"^E\d{4} \d\d:\d\d:[\d.]+ +\d+ \S+:\d+\] failed call to cuInit"),  # no GPU on this machine
    re.compile(r"^To enable the following instructions: .*rebuild TensorFlow with the appropriate compiler"),
)


def is_noise(line: str) -> bool:
    """True for a start-up line of TensorFlow that `import_tensorflow_quietly` drops."""
    return any(pattern.search(line) for pattern in NOISE)


@contextlib.contextmanager
def filtered_stderr() -> Iterator[None]:
    """While active, lines written to file descriptor 2 (by C++ or Python) that are noise are dropped."""
    sys.stderr.flush()
    original = os.dup(2)
    read_end, write_end = os.pipe()

    def forward() -> None:
        with os.fdopen(read_end, "rb") as pipe:
            for raw in pipe:
                if not is_noise(raw.decode("utf-8", "replace").rstrip("\n")):
                    os.write(original, raw)

    forwarder = threading.Thread(target=forward, name="stderr-filter", daemon=True)
    forwarder.start()
    os.dup2(write_end, 2)
    os.close(write_end)
    try:
        yield
    finally:
        sys.stderr.flush()
        os.dup2(original, 2)  # closes the pipe's last write end: the forwarder reads to its end
        forwarder.join()
        os.close(original)


def import_tensorflow_quietly() -> None:
    """Import TensorFlow and initialise its devices without the start-up noise (module docstring)."""
    if "tensorflow" in sys.modules:
        return
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # Python-side and later C++ info logs
    with filtered_stderr():
        import tensorflow as tf

        tf.config.list_physical_devices()  # device platforms initialise now (the cuInit line)
