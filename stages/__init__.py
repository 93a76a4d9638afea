"""One script per DVC stage (`python -m stages.<name> ...`), each reading only the params it declares."""
