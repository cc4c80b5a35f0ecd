"""
Optional libraries: each is imported where it is used, so that a machine without it still runs
everything that does not need it (a plain text file is prepared without zstandard or pyarrow).

    zstandard = optional("zstandard", "reading .zst files")
"""

import importlib


def optional(module, needed_for, package=None):
    """The module imported, or a one-line error saying what needs it and the pip command that installs it
    (package, by default the module's top-level name: pyarrow for pyarrow.parquet)."""
    try:
        return importlib.import_module(module)
    except ImportError:
        package = package or module.split(".")[0]
        raise SystemExit(f"missing library: {needed_for} needs {package}; pip install {package}") from None
