"""Build glue: the page-diff core is compiled by cffi (out-of-line API mode)."""

from setuptools import setup

setup(cffi_modules=["native/build_native.py:ffibuilder"])
