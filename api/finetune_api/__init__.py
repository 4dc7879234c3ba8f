"""finetune_api."""
