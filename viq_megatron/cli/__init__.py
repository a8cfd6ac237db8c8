"""The command lines of tools/*.py and of the viq-* console scripts (setup.py).

They live in the package so that an installed console script can reach them; each tools/x.py
is a shim that calls one module's `main`, so `python tools/x.py` and torchrun keep working.
They are programs: megatron-core's warnings are quieted here, before any of them imports it.
"""

from viq_megatron.runtime.extras import quiet_megatron_warnings

quiet_megatron_warnings()
