"""Vision: MiniMind-V-style vision-language models. config.py (VisionConfig, the image token), encoders.py
(transformers' SigLIP / CLIP towers), model.py (VisionLanguageModel, set_trainable), interop.py (MiniMind-V)."""
