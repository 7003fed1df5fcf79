#include "ctlive_native.h"

int ctl_version(void) { return 1; }
