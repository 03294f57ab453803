"""Generation: the one unmasking chain and its samplers, the big canvas, inpainting, and outputs."""
