# Fine-tuning and RLHF on the project's own models: SFT (full, LoRA, QLoRA, P-Tuning v2), reward model, DPO, PPO.
# Needs the `train` extra (pip install chatglm[train]).
