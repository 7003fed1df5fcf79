"""cffi builder for ``ctlive._native`` (out-of-line API mode).

The header ``ctlive_native.h`` is both the C declaration file and the cdef, so
the binding can never drift from the C code.
"""

from __future__ import annotations

import os
import pathlib

from cffi import FFI

HERE = pathlib.Path(__file__).resolve().parent
SOURCES = sorted(str(p.relative_to(HERE.parent)) for p in HERE.glob("*.c"))

ffibuilder = FFI()
ffibuilder.cdef((HERE / "ctlive_native.h").read_text())

_extra_compile = ["-std=c99", "-O3", "-Wall", "-Wextra"]
_extra_link: list[str] = []
if os.environ.get("CTLIVE_SANITIZE"):
    # AddressSanitizer build for the memory-safety test run.
    _extra_compile += ["-fsanitize=address,undefined", "-fno-omit-frame-pointer", "-O1", "-g"]
    _extra_link += ["-fsanitize=address,undefined"]

ffibuilder.set_source(
    "ctlive._native",
    '#include "ctlive_native.h"',
    sources=SOURCES,
    include_dirs=[str(HERE.relative_to(HERE.parent))],
    extra_compile_args=_extra_compile,
    extra_link_args=_extra_link,
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
