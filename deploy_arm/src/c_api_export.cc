// Translation unit of the shared C-API library; the code comes from the
// static library, which is linked in whole.
#include "dgms_rt/c_api.h"
