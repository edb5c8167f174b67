"""Run bookkeeping: run folders (`folders.py`), what a restarted command continues (`resume.py`), the run
record's provenance (`record.py`: versions, git commit, dependency lock), SLURM job arrays (`slurm.py`) and
runs compared side by side (`compare.py`)."""
