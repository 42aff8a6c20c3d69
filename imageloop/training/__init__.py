"""DAIG's training recipes: composed-query models for CIR and CIR-LoRA for diptych synthesis.

- `options`: each training's options, declared once (`CIRTrainingOptions`, `CIRLoRAOptions`); the CLI and the
  `App` methods derive from them. Imports no torch.
- `triplets`: reads a triplet dataset (`DIR/triplets.jsonl`) or a JSONL file of real triplets, and fills the
  captions real triplets lack (`describe_triplets`).
- `drsp`, `fra`: DAIG's two training-only devices as torch modules (feature-statistics perturbation
  for pre-training on synthetic triplets; an angular margin on matching pairs for fine-tuning on real ones).
- `combiner`: CLIP4CIR's Combiner and `CIRModel`, the trained model a CIR graph loads to embed a (reference
  image, modification text) query; `clip4cir`: CLIP's two encoders fine-tuned as CLIP4CIR does; `sprc`: SPRC
  on transformers' BLIP-2; `models`: a trained folder as the query model it serves and the `cir:` embedder.
- `cir`: `train_cir`, any of those models pre-trained with DRSP then fine-tuned with FRA; `checkpoints`: the
  checkpoints both trainings resume from; `cir_lora`: `train_cir_lora`, an in-context LoRA (optionally a
  mixture of LoRA experts) on FLUX.
- `progress`: what both trainings report while they run, and the loss curve they leave behind.

Importing this package (or `options`, `triplets`, `progress`) imports no torch; the other modules do, so the
faces import them inside the commands that train.
"""
