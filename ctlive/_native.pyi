# Type stub for the cffi-compiled page-diff core (native/). The C API itself is
# declared in native/ctlive_native.h; ctlive.pagediff is its typed wrapper.
from typing import Any

ffi: Any
lib: Any
