"""Shape limits the kernels and their callers agree on, in a module without Triton so that the public ops
(which import their kernels only when a Triton call runs) can read them at import time."""

DECODE_MAX_T = 16  # prefix attention's forward splits the key range over programs (decoding) for T <= this
