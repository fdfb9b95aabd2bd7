"""Evaluation of the DEF segmentation stage: confusion-matrix scores (`metrics`), bilinear
resizing matching PyTorch (`resize`) and sliding-window inference (`sliding_window`)."""
