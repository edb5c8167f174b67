"""Training plumbing that is not a callback: the precision policy (`precision.py`: what bf16/fp32 setting runs on
this hardware, said out loud) and the FSDP strategy built from a backbone adapter (`fsdp.py`)."""
