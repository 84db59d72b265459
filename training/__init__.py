"""The training loop behind train.py: one accelerate loop for every model, dataset and robot."""
