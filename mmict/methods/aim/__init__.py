"""AIM (Gao et al. 2024, arXiv 2406.07588): demos read alone by the frozen MLLM, projected into fused tokens.

- `reader.py`: `DemoReader` (hidden states at a demo's text or answer positions, read raw or as a chat turn)
  and `FusedTokenProjector`;
- `module.py`: `AIMModule`, the LightningModule (only the projector trains);
- `bank.py`: what identifies a stored AIM reading in the demonstration bank, and the bank of a module;
- `shots.py`: the histogram of demos per training episode (checkpointed, reported beside evaluation);
- `report.py`: AIM's share of vanilla ICL's gain and the context it saves, beside the methods table, and the
  line that flags evaluated shots beyond the trained ones.
"""
