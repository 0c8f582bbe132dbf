"""What train_dp.py and train_ddp.py share: flags, models, checkpoints, metrics, logging."""
