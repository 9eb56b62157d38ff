"""Hippocampus segmentation on 1 mm MR crops: a 3D U-Net, its training and its inference."""
