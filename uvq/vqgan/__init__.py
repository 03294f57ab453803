"""Stage one: the VQGAN network, its discriminator and losses, DiffAugment, and the fit-vqgan loop."""
