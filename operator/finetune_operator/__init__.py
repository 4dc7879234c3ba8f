"""finetune_operator."""
