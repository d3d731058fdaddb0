"""Training-time defences against membership inference that are not plain model or trainer arguments."""
