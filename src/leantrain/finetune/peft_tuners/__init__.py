"""Hugging Face PEFT adapters for leantrain's fine-tuning methods (GEM, PaCA).

Importing this package registers both tuners with PEFT (see :mod:`.registration`).
"""

from leantrain.finetune.peft_tuners import gem, paca  # noqa: F401  (each registers its tuner on import)
