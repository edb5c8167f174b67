"""MimIC: learnt per-head, query-dependent shifts of a frozen MLLM's attention, trained to mimic its k-shot ICL
(docs/methods.md#mimic)."""
