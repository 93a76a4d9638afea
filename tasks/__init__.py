"""Prefect tasks: thin wrappers that call the library, one run or one bookkeeping step each."""
