"""Packages: verification, the memory-fit check, the README for app developers."""
