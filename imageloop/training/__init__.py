"""DAIG's training recipes: a composed-query model for CIR and CIR-LoRA for diptych synthesis.

- `triplets`: reads a triplet dataset (`DIR/triplets.jsonl`) or a JSONL file of real triplets.
- `drsp`, `fra`: DAIG's two training-only devices as torch modules (feature-statistics perturbation
  for pre-training on synthetic triplets; an angular margin on matching pairs for fine-tuning on real ones).
- `combiner`: the light composed-query model (CLIP4CIR's Combiner over frozen embedder features) and
  `CIRModel`, the trained model a CIR graph loads to embed a (reference image, modification text) query.
- `cir`: `train_cir`, pre-training with DRSP then fine-tuning with FRA; checkpoints, resume, loss curve.
- `cir_lora`: `train_cir_lora`, an in-context LoRA (optionally a mixture of LoRA experts) on FLUX.
- `progress`: what both trainings report while they run, and the loss curve they leave behind.

Importing this package (or `triplets`, `progress`) imports no torch; the other modules do, so the
faces import them inside the commands that train.
"""
