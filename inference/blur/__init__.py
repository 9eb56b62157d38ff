"""A 3D Gaussian blur with sigma in millimetres, as a processing task that returns a derived series."""
