"""One script per DVC stage (`python -m stages.<name> ...`), each reading only the params it declares."""
import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads: see dynaprompt/__init__.py

import dynaprompt  # noqa: E402,F401  (pins the CPU kernels before a stage imports torch: dynaprompt/determinism.py)
