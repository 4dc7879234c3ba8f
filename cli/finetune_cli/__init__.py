"""finetune_cli."""
