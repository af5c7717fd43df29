"""Recipes: the runs that produce the README's figures (the demo, the RL run, the LoRA/DPO/distillation
side-by-sides), built on the library below them; nothing in the library imports them. `minimind demo --all`."""
