"""The library's version: one place, read by the package, the files it writes, the command and the build."""

__version__ = "0.1.0"
