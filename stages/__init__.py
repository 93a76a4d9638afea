"""One script per DVC stage (`python -m stages.<name> ...`), each reading only the params it declares."""
import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads: see dynaprompt/__init__.py
