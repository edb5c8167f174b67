"""LIVE (Peng et al., NeurIPS'24, "Learnable In-Context Vector for Visual Question Answering";
ForJadeForest/LIVE-Learnable-In-Context-Vector): one learnt vector per LM layer, scaled per layer, added to the
frozen MLLM's hidden states of a query shown without demos, trained so the zero-shot prompt's answer distribution
matches the same frozen model's k-shot ICL one (KL) plus the ground-truth loss.

- `vectors.py`: `LiveVectors`, the only trainable parameters (vectors and per-layer scales);
- `module.py`: `LIVEModule`, the LightningModule: the teacher (k demos, vanilla ICL prompt, no_grad, vectors off),
  the student (the zero-shot prompt, vectors on through `mmict.backbones.steering`), their losses, and how
  evaluation names its rows (no demos at evaluation; the shots are the teacher's).
"""
