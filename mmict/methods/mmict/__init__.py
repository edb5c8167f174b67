"""MMICT (Chen et al. 2023, arXiv 2312.06363): a trainable Multi-Modal Hub (M-Hub) feeds a frozen LLM.

- `hub.py`: the M-Hub (InstructBLIP Q-Former with text input, video memory, BLIP-2 initialisation);
- `text_init.py`: where the M-Hub's text branch starts (`method.mmict.text_init`: BERT's weights, as LAVIS) and
  which designs' queries read their prompt (`method.mmict.query_text`);
- `module.py`: `MMICTModule`, the LightningModule, with the demo designs fused / concat / text / none.
"""
